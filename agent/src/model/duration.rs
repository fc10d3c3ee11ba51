//! Durations as people write them on command lines.

use std::time::Duration;

/// `500ms`, `5s`, `2m`, or plain seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let value: f64 =
        number.trim().parse().map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 5s, 2m)"))?;
    if !(value.is_finite() && value > 0.0) {
        return Err(format!("{s:?}: a duration must be positive"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}
