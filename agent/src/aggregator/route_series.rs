//! Handles of the per-(model, route) request series, kept after their first use: a request
//! then costs a few atomic updates instead of hashing its labels in every family it touches.
//! Models and routes are both bounded (see `MAX_MODELS`, `http::routes`), so is this cache.

use std::cell::OnceCell;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter, exemplar::HistogramWithExemplars, family::Family, gauge::Gauge,
        histogram::Histogram,
    },
};

use super::{
    cardinality::SeriesBudget,
    families::{FamilyLabels, LATENCY_BUCKETS, Metrics, ModelRoute, RequestLabels, StreamEventLabels},
};

/// The trace of a recent request in a latency bucket (an OpenMetrics exemplar), so that a
/// dashboard can jump from a latency to that request's trace.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TraceExemplar {
    pub trace_id: String,
}

pub(crate) type TracedHistogram = HistogramWithExemplars<TraceExemplar>;
pub(crate) type TracedHistograms<L> = Family<L, TracedHistogram, fn() -> TracedHistogram>;

pub(crate) fn traced_latency_histogram() -> TracedHistogram {
    HistogramWithExemplars::new(LATENCY_BUCKETS.into_iter())
}

/// The family of `inferwatch_http_requests_total`, capped by the series budget.
pub(crate) const HTTP_REQUESTS: &str = "inferwatch_http_requests";

#[derive(Default)]
pub(crate) struct RouteSeriesCache {
    by_route: foldhash::HashMap<&'static str, Vec<RouteSeries>>,
}

impl RouteSeriesCache {
    pub fn get(&mut self, model: &str, route: &'static str) -> &mut RouteSeries {
        let list = self.by_route.entry(route).or_default();
        let at = match list.iter().position(|s| s.labels.model == model) {
            Some(i) => i,
            None => {
                list.push(RouteSeries::new(ModelRoute { model: model.to_string(), route }));
                list.len() - 1
            }
        };
        &mut list[at]
    }
}

/// One (model, route): each handle is taken from its family the first time it is needed,
/// so a series appears only once something was recorded in it, as before.
pub(crate) struct RouteSeries {
    labels: ModelRoute,
    in_flight: OnceCell<Gauge>,
    response_headers: OnceCell<Histogram>,
    time_to_first_token: OnceCell<TracedHistogram>,
    request_duration: OnceCell<TracedHistogram>,
    chunk_gap: OnceCell<Histogram>,
    content_events: OnceCell<Counter>,
    other_events: OnceCell<Counter>,
    request_bytes: OnceCell<Counter>,
    response_bytes: OnceCell<Counter>,
    /// By (status, outcome).
    requests: Vec<(u16, &'static str, Counter)>,
}

impl RouteSeries {
    fn new(labels: ModelRoute) -> Self {
        Self {
            labels,
            in_flight: OnceCell::new(),
            response_headers: OnceCell::new(),
            time_to_first_token: OnceCell::new(),
            request_duration: OnceCell::new(),
            chunk_gap: OnceCell::new(),
            content_events: OnceCell::new(),
            other_events: OnceCell::new(),
            request_bytes: OnceCell::new(),
            response_bytes: OnceCell::new(),
            requests: Vec::new(),
        }
    }

    pub fn in_flight(&self, m: &Metrics) -> &Gauge {
        self.in_flight.get_or_init(|| m.in_flight.get_or_create(&self.labels).clone())
    }

    pub fn response_headers(&self, m: &Metrics) -> &Histogram {
        self.response_headers.get_or_init(|| m.response_headers.get_or_create(&self.labels).clone())
    }

    pub fn time_to_first_token(&self, m: &Metrics) -> &TracedHistogram {
        self.time_to_first_token.get_or_init(|| m.time_to_first_token.get_or_create(&self.labels).clone())
    }

    pub fn request_duration(&self, m: &Metrics) -> &TracedHistogram {
        self.request_duration.get_or_init(|| m.request_duration.get_or_create(&self.labels).clone())
    }

    pub fn chunk_gap(&self, m: &Metrics) -> &Histogram {
        self.chunk_gap.get_or_init(|| m.chunk_gap.get_or_create(&self.labels).clone())
    }

    /// SSE events of a stream: `content` (carries a token) or `other`.
    pub fn stream_events(&self, m: &Metrics, content: bool) -> &Counter {
        let (cell, kind) =
            if content { (&self.content_events, "content") } else { (&self.other_events, "other") };
        cell.get_or_init(|| {
            let labels =
                StreamEventLabels { model: self.labels.model.clone(), route: self.labels.route, kind };
            m.stream_events.get_or_create(&labels).clone()
        })
    }

    pub fn request_bytes(&self, m: &Metrics) -> &Counter {
        self.request_bytes.get_or_init(|| m.request_bytes.get_or_create(&self.labels).clone())
    }

    pub fn response_bytes(&self, m: &Metrics) -> &Counter {
        self.response_bytes.get_or_init(|| m.response_bytes.get_or_create(&self.labels).clone())
    }

    /// Counts a finished request under its status and outcome; a new (status, outcome) needs
    /// room in the budget (status codes come from the server), else it is counted as refused.
    pub fn count_request(
        &mut self,
        m: &Metrics,
        budget: &mut SeriesBudget,
        status: u16,
        outcome: &'static str,
    ) {
        if let Some((_, _, counter)) = self.requests.iter().find(|(s, o, _)| *s == status && *o == outcome) {
            counter.inc();
            return;
        }
        let labels =
            RequestLabels { model: self.labels.model.clone(), route: self.labels.route, status, outcome };
        if budget.admit(HTTP_REQUESTS, &labels) {
            let counter = m.http_requests.get_or_create(&labels).clone();
            counter.inc();
            self.requests.push((status, outcome, counter));
        } else {
            m.series_refused.get_or_create(&FamilyLabels { family: HTTP_REQUESTS }).inc();
        }
    }
}
