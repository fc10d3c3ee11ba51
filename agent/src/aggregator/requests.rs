//! Finished requests: their metrics, their phases (joined with the engine hand-off), and the
//! records `/api/v1/requests` serves; bounded model labels.

use super::{
    Aggregator,
    families::{PhaseLabels, ReasonLabels},
    route_series::TraceExemplar,
    store::RECENT_REQUESTS,
};
use crate::{
    model::{
        request::{GENERATION_ROUTES, RequestRecord},
        trace::{RequestSpan, to_hex},
    },
    requests::{
        handoff::{self, Phases},
        http::{FinishedRequest, Outcome, Progress},
    },
};

/// Distinct `model` label values; later names are exported as `other`.
pub(crate) const MAX_MODELS: usize = 32;

/// The label of each request in flight on a connection, oldest first: a request keeps the label
/// it started with (its in-flight gauge is taken back under it) whatever is learnt meanwhile.
pub(super) type InFlightLabels = foldhash::HashMap<u64, std::collections::VecDeque<(String, &'static str)>>;

impl Aggregator {
    /// The model label a request starts with. Where discovery knows what the instance serves
    /// (`/v1/models`, its command line), a named model is its label only if it is one of those,
    /// else `other`: a client naming junk models cannot take label values. Where it does not
    /// (a `--pid` that is not vLLM), only models seen served successfully before qualify (see
    /// [`Self::admit_model`]), at most [`MAX_MODELS`] of them.
    pub(super) fn model_label(&self, named: Option<&str>, tgid: u32) -> String {
        let served = self.instance_served.get(&tgid).filter(|s| !s.is_empty());
        match (named, served) {
            (None, Some(served)) if served.len() == 1 => served[0].clone(),
            (None, _) => "unknown".into(),
            (Some(m), Some(served)) if served.iter().any(|s| s == m) => m.to_string(),
            (Some(_), Some(_)) => "other".into(),
            (Some(m), None) if self.models.contains(m) => m.to_string(),
            (Some(_), None) => "other".into(),
        }
    }

    /// A request that named a model ended well: for instances whose models discovery does not
    /// know, the model becomes a label value (for later requests) while there is room. Never
    /// from a request the server refused.
    pub(super) fn admit_model(&mut self, named: Option<&str>, tgid: u32, status: u16) {
        let Some(m) = named else { return };
        let served_known = self.instance_served.get(&tgid).is_some_and(|s| !s.is_empty());
        if served_known
            || !(200..400).contains(&status)
            || self.models.contains(m)
            || self.models.len() >= MAX_MODELS
        {
            return;
        }
        self.models.insert(m.to_string());
    }

    /// Takes what one transfer revealed out of `update` (leaving it empty, its room kept).
    pub(super) fn http_update(&mut self, tgid: u32, update: &mut Progress) {
        if let Some(reason) = update.not_http.take() {
            self.store.metrics.not_http.get_or_create(&ReasonLabels { reason }).inc();
        }
        for started in update.started.drain(..) {
            let model = self.model_label(started.model.as_deref(), tgid);
            self.route_series.get(&model, started.route).in_flight(&self.store.metrics).inc();
            self.in_flight_labels.entry(started.conn_id).or_default().push_back((model, started.route));
        }
        for gap in update.gaps.drain(..) {
            let Some((model, route)) = self.in_flight_labels.get(&gap.conn_id).and_then(|q| q.front()) else {
                continue;
            };
            let series = self.route_series.get(model, route);
            series.chunk_gap(&self.store.metrics).observe(gap.ns as f64 / 1e9);
        }
        for req in update.finished.drain(..) {
            self.finished(tgid, req);
        }
    }

    fn finished(&mut self, tgid: u32, req: FinishedRequest) {
        let started = self.in_flight_labels.get_mut(&req.conn_id).and_then(|q| q.pop_front());
        if self.in_flight_labels.get(&req.conn_id).is_some_and(|q| q.is_empty()) {
            self.in_flight_labels.remove(&req.conn_id);
        }
        // Counted under what is known at its end: a model the server just accepted (and that
        // found room) is its label now, though its in-flight gauge is taken back under the
        // label it started with.
        self.admit_model(req.model.as_deref(), tgid, req.status);
        let model = self.model_label(req.model.as_deref(), tgid);
        let m = &self.store.metrics;
        match started {
            Some((at_start, route)) if at_start != model => {
                self.route_series.get(&at_start, route).in_flight(m).dec();
            }
            _ => {
                self.route_series.get(&model, req.route).in_flight(m).dec();
            }
        }
        // The request's trace: the client's, or (spans being exported) a new one; whether its
        // spans are exported (sampled), and then its trace id as the exemplar of its latencies.
        let trace_id = match &req.trace {
            Some(t) => Some(t.trace_id),
            None => self.spans.is_some().then(|| self.trace_ids.trace_id()),
        };
        let exported = match (&self.spans, trace_id) {
            (Some(sink), Some(id)) => sink.samples(
                &id,
                req.trace.as_ref().map(|t| t.sampled),
                req.outcome == Outcome::Complete,
                req.first_token_ns.unwrap_or(req.end_ns).saturating_sub(req.received_ns),
            ),
            _ => false,
        };
        let exemplar =
            || exported.then(|| TraceExemplar { trace_id: trace_id.map(|t| to_hex(&t)).unwrap_or_default() });
        let m = &self.store.metrics;
        let series = self.route_series.get(&model, req.route);
        let outcome = req.outcome.as_str();
        series.count_request(m, &mut self.budget, req.status, outcome);
        let since = |t: u64| t.saturating_sub(req.received_ns) as f64 / 1e9;
        let headers = req.headers_ns.map(since);
        let ttft = req.first_token_ns.map(since);
        if let (Some(t), Some(instance)) = (ttft, self.instance_of_pid.get(&tgid)) {
            let acc = self.ttft_since_scrape.entry(instance.clone()).or_insert((0.0, 0));
            acc.0 += t;
            acc.1 += 1;
        }
        let duration = since(req.end_ns);
        if let Some(h) = headers {
            series.response_headers(m).observe(h);
        }
        if let Some(t) = ttft {
            series.time_to_first_token(m).observe(t, exemplar(), None);
        }
        series.request_duration(m).observe(duration, exemplar(), None);
        if req.events > 0 {
            series.stream_events(m, true).inc_by(req.content_events as u64);
            series.stream_events(m, false).inc_by((req.events - req.content_events) as u64);
        }
        series.request_bytes(m).inc_by(req.request_bytes);
        series.response_bytes(m).inc_by(req.response_bytes);

        let ipc = req.response_id.as_deref().and_then(|id| self.handoff.take(id));
        let generation = GENERATION_ROUTES.contains(&req.route) && req.status == 200;
        let (phases, unmatched) =
            match handoff::phases(req.first_read_ns, req.first_token_ns, req.end_ns, ipc.as_ref()) {
                Ok(p) => (Some(p), None),
                Err(reason) if generation => (None, Some(reason)),
                Err(_) => (None, None),
            };
        let m = &self.store.metrics;
        if let Some(reason) = unmatched {
            m.phase_unmatched.get_or_create(&ReasonLabels { reason }).inc();
        }
        // Arrival → first read: time in the socket (the accept queue first, for a new connection)
        // while the server did something else. Known only where the kernel told the arrival.
        let queued =
            req.arrival_known.then(|| req.first_read_ns.saturating_sub(req.received_ns) as f64 / 1e9);
        if let (Some(p), Some(t), Some(instance)) = (&phases, ttft, self.instance_of_pid.get(&tgid)) {
            let sums = self.phase_sums.entry(instance.clone()).or_default();
            sums.ttft += t;
            sums.frontend += queued.unwrap_or(0.0) + p.frontend_in + p.frontend_out;
            sums.queued += queued.unwrap_or(0.0);
        }
        let m = &self.store.metrics;
        // Every generation request's wait is observed, whether or not its engine phases matched:
        // a server that is not vLLM (a gateway, another engine) has a busy loop too.
        if let Some(q) = queued.filter(|_| GENERATION_ROUTES.contains(&req.route)) {
            m.request_phase.get_or_create(&PhaseLabels { phase: "queued", model: model.clone() }).observe(q);
        }
        if let Some(p) = &phases {
            let observe = |phase: &'static str, v: Option<f64>| {
                if let Some(v) = v {
                    m.request_phase.get_or_create(&PhaseLabels { phase, model: model.clone() }).observe(v);
                }
            };
            observe("frontend_in", Some(p.frontend_in));
            observe("engine_first", p.engine_first);
            observe("engine", p.engine);
            observe("frontend_out", Some(p.frontend_out));
            observe("decode", p.decode);
        }
        let phase = |f: fn(&Phases) -> Option<f64>| phases.as_ref().and_then(f);
        if let (Some(sink), Some(trace_id), true) = (&self.spans, trace_id, exported) {
            sink.offer(self.request_span(&req, trace_id, tgid, &model, queued, phases.as_ref(), ttft));
        }

        let record = RequestRecord {
            pid: tgid,
            method: req.method.into(),
            route: req.route.into(),
            model,
            status: req.status,
            outcome: outcome.into(),
            stream: req.stream,
            request_bytes: req.request_bytes,
            response_bytes: req.response_bytes,
            events: req.events,
            content_events: req.content_events,
            received_monotonic_ns: req.received_ns,
            received_unix_seconds: (req.received_ns as i128 + self.store.realtime_offset_ns) as f64 / 1e9,
            response_headers_seconds: headers,
            time_to_first_token_seconds: ttft,
            duration_seconds: duration,
            max_chunk_gap_seconds: req.max_chunk_gap_ns.map(|g| g as f64 / 1e9),
            queued_seconds: queued,
            trace_id: trace_id.map(|t| to_hex(&t)),
            first_read_monotonic_ns: req.first_read_ns,
            connection_established_monotonic_ns: req.established_ns,
            frontend_in_seconds: phase(|p| Some(p.frontend_in)),
            engine_first_seconds: phase(|p| p.engine_first),
            engine_seconds: phase(|p| p.engine),
            frontend_out_seconds: phase(|p| Some(p.frontend_out)),
            decode_seconds: phase(|p| p.decode),
            phases_unmatched: unmatched.map(Into::into),
        };
        let mut recent = self.store.recent.write();
        if recent.len() >= RECENT_REQUESTS {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    /// The request as a trace span: its arrival to its end, and its phases laid end to end from
    /// the first read (each phase's exact kernel time), in Unix time.
    #[expect(clippy::too_many_arguments, reason = "one request's parts, computed once by the caller")]
    fn request_span(
        &self,
        req: &FinishedRequest,
        trace_id: [u8; 16],
        tgid: u32,
        model: &str,
        queued: Option<f64>,
        phases: Option<&Phases>,
        ttft: Option<f64>,
    ) -> RequestSpan {
        let unix = |mono: u64| (mono as i128 + self.store.realtime_offset_ns).max(0) as u64;
        let mut spans = Vec::new();
        if queued.is_some() {
            spans.push(("queued", unix(req.received_ns), unix(req.first_read_ns)));
        }
        if let Some(p) = phases {
            let mut at = req.first_read_ns;
            let parts = [
                ("frontend_in", Some(p.frontend_in)),
                ("engine_first", p.engine_first),
                ("engine", p.engine),
                ("frontend_out", Some(p.frontend_out)),
                ("decode", p.decode),
            ];
            for (name, seconds) in parts {
                if let Some(s) = seconds {
                    let end = at + (s * 1e9).round() as u64;
                    spans.push((name, unix(at), unix(end)));
                    at = end;
                }
            }
        }
        RequestSpan {
            trace: req.trace.clone(),
            trace_id,
            pid: tgid,
            method: req.method,
            route: req.route,
            model: model.to_string(),
            status: req.status,
            outcome: req.outcome.as_str(),
            stream: req.stream,
            response_id: req.response_id.clone(),
            start_unix_ns: unix(req.received_ns),
            end_unix_ns: unix(req.end_ns),
            time_to_first_token_seconds: ttft,
            request_bytes: req.request_bytes,
            response_bytes: req.response_bytes,
            content_events: req.content_events,
            usage: req.usage,
            phases: spans,
        }
    }
}
