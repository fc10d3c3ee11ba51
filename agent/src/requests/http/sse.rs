//! Server-sent events inside a response body, and which of them carry content.

use super::{Needle, find, needle};

/// What an event was, for timing purposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventClass {
    /// Carries generated content (a token): counts for time to first token and chunk gaps.
    Content,
    /// An event without content: a chat role chunk, a keep-alive.
    Other,
    /// The stream's usage chunk (`"choices":[]` with `"usage"`): its token counts, when both
    /// were seen.
    Usage { input: u32, output: u32 },
    /// `data: [DONE]`.
    Done,
}

/// Bytes of an event's data kept for classification; the rest is only counted.
const KEEP_DATA: usize = 1024;
/// Bytes of a line kept; a longer line is truncated (its data still counts as seen).
const KEEP_LINE: usize = 2048;

#[derive(Debug, Default, Clone)]
pub struct SseParser {
    line: Vec<u8>,
    line_truncated: bool,
    data: Vec<u8>,
    has_data: bool,
    truncated: bool,
}

impl SseParser {
    /// Heap bytes held (at most `KEEP_LINE + KEEP_DATA`, rounded up by the allocator).
    pub fn buffered(&self) -> usize {
        self.line.capacity() + self.data.capacity()
    }

    /// Feeds known body bytes; completed events are passed to `on_event`.
    pub fn feed(&mut self, bytes: &[u8], on_event: &mut impl FnMut(EventClass)) {
        let mut rest = bytes;
        loop {
            let end = memchr::memchr(b'\n', rest);
            let part = &rest[..end.unwrap_or(rest.len())];
            let room = KEEP_LINE - self.line.len();
            self.line.extend_from_slice(&part[..part.len().min(room)]);
            self.line_truncated |= part.len() > room;
            let Some(end) = end else { return };
            self.end_line(on_event);
            rest = &rest[end + 1..];
        }
    }

    /// Body bytes we could not see: the event in progress is truncated.
    pub fn gap(&mut self) {
        self.truncated = true;
        self.has_data = true;
    }

    /// The end of one transfer. Servers write whole events per call, so an event that lost
    /// its end to a gap is taken to end with the transfer that carried it.
    pub fn transfer_end(&mut self, on_event: &mut impl FnMut(EventClass)) {
        if self.truncated {
            self.line.clear();
            self.dispatch(on_event);
        }
    }

    fn end_line(&mut self, on_event: &mut impl FnMut(EventClass)) {
        let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        if line.is_empty() {
            self.dispatch(on_event);
        } else if let Some(value) = line.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if self.has_data && self.data.len() < KEEP_DATA {
                self.data.push(b'\n');
            }
            let room = KEEP_DATA.saturating_sub(self.data.len());
            self.data.extend_from_slice(&value[..value.len().min(room)]);
            self.has_data = true;
            self.truncated |= self.line_truncated;
        }
        // Other fields (event:, id:, retry:) and comments (":") carry no content.
        self.line.clear();
        self.line_truncated = false;
    }

    fn dispatch(&mut self, on_event: &mut impl FnMut(EventClass)) {
        if self.has_data {
            on_event(classify(&self.data, self.truncated));
        }
        self.data.clear();
        self.has_data = false;
        self.truncated = false;
    }
}

static CHOICES: Needle = needle!(b"\"choices\"");
static USAGE: Needle = needle!(b"\"usage\"");
static PROMPT_TOKENS: Needle = needle!(b"\"prompt_tokens\"");
static COMPLETION_TOKENS: Needle = needle!(b"\"completion_tokens\"");
static TOOL_CALLS: Needle = needle!(b"\"tool_calls\"");
static TEXT: Needle = needle!(b"\"text\"");
static CONTENT: Needle = needle!(b"\"content\"");
static REASONING_CONTENT: Needle = needle!(b"\"reasoning_content\"");
static REASONING: Needle = needle!(b"\"reasoning\"");

/// Classifies an event's data. OpenAI-style JSON: completions carry content in a non-empty
/// `text`, chat in a non-empty `delta.content` (or reasoning) or any tool call; a chunk with
/// empty `choices` is usage. Any other payload counts as content. An event whose end we could
/// not see and whose visible part decides nothing is taken as content.
///
/// Works on bytes (the data may be cut anywhere, even inside a UTF-8 sequence): every key and
/// delimiter looked for is ASCII.
pub fn classify(data: &[u8], truncated: bool) -> EventClass {
    let text = data.trim_ascii();
    if text == b"[DONE]" {
        return EventClass::Done;
    }
    if !text.starts_with(b"{") || find(text, &CHOICES).is_none() {
        return EventClass::Content;
    }
    if let Some(v) = value_after(text, &CHOICES)
        && let Some(inside) = v.strip_prefix(b"[")
        && inside.trim_ascii_start().starts_with(b"]")
    {
        return match value_after(text, &USAGE)
            .map(|u| (count(u, &PROMPT_TOKENS), count(u, &COMPLETION_TOKENS)))
        {
            Some((Some(input), Some(output))) => EventClass::Usage { input, output },
            _ => EventClass::Other,
        };
    }
    if find(text, &TOOL_CALLS).is_some() {
        return EventClass::Content;
    }
    let mut decided = false;
    for key in [&TEXT, &CONTENT, &REASONING_CONTENT, &REASONING] {
        match string_value_is_empty(text, key) {
            Some(false) => return EventClass::Content,
            Some(true) => decided = true,
            None => {}
        }
    }
    if decided || !truncated { EventClass::Other } else { EventClass::Content }
}

/// The bytes after `"key":` (whitespace skipped), for the first occurrence of the key;
/// `quoted_key` includes its quotes.
fn value_after<'a>(json: &'a [u8], quoted_key: &Needle) -> Option<&'a [u8]> {
    let mut rest = json;
    while let Some(i) = find(rest, quoted_key) {
        rest = &rest[i + quoted_key.len()..];
        if let Some(v) = rest.trim_ascii_start().strip_prefix(b":") {
            return Some(v.trim_ascii_start());
        }
    }
    None
}

/// For `"key": <integer>` in `json`: the integer, if it fits a `u32`.
fn count(json: &[u8], quoted_key: &Needle) -> Option<u32> {
    let v = value_after(json, quoted_key)?;
    let digits = v.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 9 {
        return None;
    }
    std::str::from_utf8(&v[..digits]).ok()?.parse().ok()
}

/// For `"key": "<string>"`: whether that string is empty. None if the key is absent, null, or
/// cut off before its value.
fn string_value_is_empty(json: &[u8], quoted_key: &Needle) -> Option<bool> {
    let v = value_after(json, quoted_key)?;
    let s = v.strip_prefix(b"\"")?;
    Some(*s.first()? == b'"')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(stream: &[u8]) -> Vec<EventClass> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        p.feed(stream, &mut |e| out.push(e));
        out
    }

    #[test]
    fn completions_events() {
        let s = b"data: {\"id\":\"cmpl-1\",\"choices\":[{\"index\":0,\"text\":\" at\"}]}\n\n\
data: {\"id\":\"cmpl-1\",\"choices\":[{\"index\":0,\"text\":\"\"}]}\n\n\
data: {\"id\":\"cmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":2}}\n\n\
data: {\"id\":\"cmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"total_tokens\":9,\"completion_tokens\": 7}}\n\n\
data: [DONE]\n\n";
        use EventClass::*;
        assert_eq!(events(s), vec![Content, Other, Other, Usage { input: 2, output: 7 }, Done]);
    }

    #[test]
    fn chat_role_chunk_is_not_content() {
        use EventClass::*;
        let role = br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null}]}"#;
        assert_eq!(classify(role, false), Other);
        let role_only = br#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#;
        assert_eq!(classify(role_only, false), Other);
        let token = br#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#;
        assert_eq!(classify(token, false), Content);
        let tool = br#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]}}]}"#;
        assert_eq!(classify(tool, false), Content);
        let reasoning = br#"{"choices":[{"delta":{"reasoning_content":"hmm","content":null}}]}"#;
        assert_eq!(classify(reasoning, false), Content);
        let spaced = br#"{ "choices": [ { "delta": { "content": "x" } } ] }"#;
        assert_eq!(classify(spaced, false), Content);
    }

    #[test]
    fn other_payloads_and_truncation() {
        use EventClass::*;
        assert_eq!(classify(b"hello", false), Content);
        assert_eq!(classify(br#"{"type":"response.output_text.delta"}"#, false), Content);
        assert_eq!(classify(br#"{"id":"cmpl-1","choices":[{"index":0,"logprobs":{"tok"#, true), Content);
        assert_eq!(classify(br#"{"id":"cmpl-1","choices":[{"index":0,"text":"","logpr"#, true), Other);
    }

    #[test]
    fn multi_line_data_comments_and_crlf() {
        use EventClass::*;
        assert_eq!(events(b": keep-alive\r\n\r\nevent: x\r\ndata: a\r\ndata: b\r\n\r\n"), vec![Content]);
    }

    #[test]
    fn truncated_event_ends_with_its_transfer() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        p.feed(b"data: {\"choices\":[{\"text\":\"x", &mut |e| out.push(e));
        p.gap();
        p.transfer_end(&mut |e| out.push(e));
        assert_eq!(out, vec![EventClass::Content]);
        p.feed(b"data: [DONE]\n\n", &mut |e| out.push(e));
        assert_eq!(out, vec![EventClass::Content, EventClass::Done]);
    }
}
