//! Bounded labels from request heads and bodies: the route and the model.

/// OpenAI-compatible and vLLM routes, exported literally; anything else is `other`.
const KNOWN_ROUTES: &[&str] = &[
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/models",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/rerank",
    "/v2/rerank",
    "/rerank",
    "/v1/score",
    "/score",
    "/pooling",
    "/classify",
    "/tokenize",
    "/detokenize",
    "/invocations",
    "/health",
    "/ping",
    "/metrics",
    "/version",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
];

/// The route label for a request target: its path (no query) if known, else `other`.
pub fn route_of(target: &str) -> &'static str {
    let path = target.split(['?', '#']).next().unwrap_or_default();
    let path = if path.len() > 1 { path.trim_end_matches('/') } else { path };
    KNOWN_ROUTES.iter().find(|r| **r == path).copied().unwrap_or("other")
}

/// The top-level `"model"` string of a JSON request body, if it is in the captured bytes and
/// looks like a model name (letters, digits and `._-:/@+`, at most 128 of them).
pub fn model_from_body(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let mut rest = text.as_ref();
    while let Some(i) = rest.find("\"model\"") {
        let after = rest[i + 7..].trim_start();
        rest = &rest[i + 7..];
        let Some(after) = after.strip_prefix(':') else { continue };
        let Some(value) = after.trim_start().strip_prefix('"') else { continue };
        let end = value.find('"')?;
        let name = &value[..end];
        let valid = !name.is_empty()
            && name.len() <= 128
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-:/@+".contains(c));
        return valid.then(|| name.to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_routes_are_literal_and_the_rest_is_other() {
        assert_eq!(route_of("/v1/chat/completions"), "/v1/chat/completions");
        assert_eq!(route_of("/v1/completions?x=1"), "/v1/completions");
        assert_eq!(route_of("/v1/completions/"), "/v1/completions");
        assert_eq!(route_of("/v1/completions/../../etc"), "other");
        assert_eq!(route_of("/user/12345"), "other");
        assert_eq!(route_of("*"), "other");
    }

    #[test]
    fn model_is_read_from_the_body() {
        assert_eq!(model_from_body(br#"{"model":"tiny","prompt":"x"}"#).as_deref(), Some("tiny"));
        assert_eq!(
            model_from_body(br#"{"prompt": "say \"model\"", "model" : "meta-llama/Llama-3.1-8B"}"#)
                .as_deref(),
            Some("meta-llama/Llama-3.1-8B")
        );
        assert_eq!(model_from_body(br#"{"prompt":"x"}"#), None);
        assert_eq!(model_from_body(br#"{"model":"trunc"#), None, "cut off by the capture");
        assert_eq!(model_from_body(br#"{"model":"<script>"}"#), None, "not a model name");
    }
}
