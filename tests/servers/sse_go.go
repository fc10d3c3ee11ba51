// The fidelity tests' completions server on Go's net/http, written as Go servers are: one
// `Write` + `Flush` per SSE event (a chunk per flush), the terminator written when the handler
// returns. Same protocol as sse_app.py: POST /v1/completions {"model", "max_tokens", "stream",
// "delay_ms"}: an empty first event, then `max_tokens` events `delay_ms` apart, then
// `data: [DONE]`. Standard library only (builds offline). Usage: sse_go PORT
package main

import (
	"encoding/json"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

type request struct {
	Model     string   `json:"model"`
	MaxTokens *int     `json:"max_tokens"`
	Stream    bool     `json:"stream"`
	DelayMs   *float64 `json:"delay_ms"`
}

type choice struct {
	Index        int     `json:"index"`
	Text         string  `json:"text"`
	FinishReason *string `json:"finish_reason"`
}

type completion struct {
	ID      string   `json:"id"`
	Object  string   `json:"object"`
	Model   string   `json:"model"`
	Choices []choice `json:"choices"`
}

func event(model, text string) []byte {
	b, _ := json.Marshal(completion{"cmpl-test", "text_completion", model, []choice{{0, text, nil}}})
	return append(append([]byte("data: "), b...), '\n', '\n')
}

func handle(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	var req request
	_ = json.Unmarshal(body, &req)
	if r.URL.Path != "/v1/completions" {
		http.NotFound(w, r)
		return
	}
	model, tokens, delay := req.Model, 8, 2.0
	if model == "" {
		model = "test-model"
	}
	if req.MaxTokens != nil {
		tokens = *req.MaxTokens
	}
	if req.DelayMs != nil {
		delay = *req.DelayMs
	}
	pause := time.Duration(delay * float64(time.Millisecond))
	if !req.Stream {
		time.Sleep(pause * time.Duration(tokens))
		out, _ := json.Marshal(completion{"cmpl-test", "text_completion", model,
			[]choice{{0, strings.Repeat(" t", tokens), nil}}})
		w.Header().Set("content-type", "application/json")
		_, _ = w.Write(out)
		return
	}
	flusher := w.(http.Flusher)
	w.Header().Set("content-type", "text/event-stream; charset=utf-8")
	w.WriteHeader(200)
	_, _ = w.Write(event(model, ""))
	flusher.Flush()
	for i := 0; i < tokens; i++ {
		time.Sleep(pause)
		if _, err := w.Write(event(model, " t"+itoa(i))); err != nil {
			return
		}
		flusher.Flush()
	}
	_, _ = w.Write([]byte("data: [DONE]\n\n"))
}

func itoa(i int) string {
	b, _ := json.Marshal(i)
	return string(b)
}

func main() {
	http.HandleFunc("/", handle)
	if err := http.ListenAndServe("127.0.0.1:"+os.Args[1], nil); err != nil {
		panic(err)
	}
}
