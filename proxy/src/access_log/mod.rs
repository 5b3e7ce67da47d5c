//! Access logs (`access_log` of the HTTP connection manager and of `tcp_proxy`).
//!
//! ```text
//! config time:  AccessLog proto -> AccessLogger { filter, Formatter (parsed once), Arc<Sink> }
//! request end:  LogRecord (borrowed facts) -> filter? -> format into a thread-local
//!               String (worker; no allocation) -> Sink::write: append to the sink's buffer
//!               (short lock, never waits for I/O; over the limit = dropped and counted)
//!               -> writer thread per file/stream: swap the buffer out every 100 ms (or at
//!                  64 KiB) and write it with one syscall
//! ```
//!
//! Supported loggers: `envoy.access_loggers.file` (`FileAccessLog`: `path`, `format`,
//! `json_format`, `typed_json_format`, `log_format`), `envoy.access_loggers.stdout` and
//! `envoy.access_loggers.stderr` (`log_format`). Filters: status code, duration,
//! not_health_check, traceable, runtime (its default percent; weir has no runtime), and/or,
//! header, response flag. See [`format`] for the command operators and [`flags`] for response
//! flags.

pub mod flags;
pub mod format;
pub mod sink;

use std::sync::Arc;

use weir_filters::config::Fraction;
use weir_filters::{RequestHead, RequestMatcher};
use weir_xds_api::pb::envoy::config::accesslog::v3 as alpb;
use weir_xds_api::pb::envoy::config::core::v3 as core;
use weir_xds_api::pb::envoy::extensions::access_loggers::file::v3::{
    FileAccessLog, file_access_log,
};
use weir_xds_api::pb::envoy::extensions::access_loggers::stream::v3::{
    StderrAccessLog, StdoutAccessLog, stderr_access_log, stdout_access_log,
};

use crate::config::{Errors, TranslateCtx, join};
pub use flags::{Flag, ResponseFlags, SharedFlags};
pub use format::{Format, HeaderView, JsonFormat, LogRecord};
pub use sink::{Sink, Target};

/// A parsed line format.
#[derive(Debug, Clone)]
pub enum Formatter {
    /// Text with command operators.
    Text(Format),
    /// One JSON object per line.
    Json(JsonFormat),
}

impl Formatter {
    /// Render one line.
    pub fn render(&self, rec: &LogRecord<'_>) -> String {
        let mut s = String::with_capacity(256);
        self.render_into(rec, &mut s);
        s
    }

    /// Append the rendering of one line to `out`.
    pub fn render_into(&self, rec: &LogRecord<'_>, out: &mut String) {
        match self {
            Formatter::Text(f) => f.render_into(rec, out),
            Formatter::Json(f) => f.render_into(rec, out),
        }
    }

    /// The request and response header names the format reads.
    pub fn header_names(&self, req: &mut Vec<String>, resp: &mut Vec<String>) {
        match self {
            Formatter::Text(f) => f.header_names(req, resp),
            Formatter::Json(f) => f.header_names(req, resp),
        }
    }
}

/// `ComparisonFilter.op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    /// `EQ`.
    Eq,
    /// `GE`.
    Ge,
    /// `LE`.
    Le,
    /// `NE`.
    Ne,
}

impl Cmp {
    fn test(self, v: u64, x: u64) -> bool {
        match self {
            Cmp::Eq => v == x,
            Cmp::Ge => v >= x,
            Cmp::Le => v <= x,
            Cmp::Ne => v != x,
        }
    }
}

/// A compiled `AccessLogFilter`.
#[derive(Debug, Clone)]
pub enum Filter {
    /// `status_code_filter`.
    StatusCode(Cmp, u64),
    /// `duration_filter` (ms).
    Duration(Cmp, u64),
    /// `not_health_check_filter`.
    NotHealthCheck,
    /// `traceable_filter`: the request is traced (sampled).
    Traceable,
    /// `runtime_filter`: `percent_sampled` (weir has no runtime overrides).
    Runtime(Fraction),
    /// `and_filter`.
    And(Vec<Filter>),
    /// `or_filter`.
    Or(Vec<Filter>),
    /// `header_filter`.
    Header(Arc<dyn RequestMatcher>),
    /// `response_flag_filter` (empty: any flag).
    ResponseFlag(ResponseFlags),
}

impl Filter {
    /// Whether `rec` is logged; `roll` is a random number (runtime filter).
    pub fn evaluate(&self, rec: &LogRecord<'_>, roll: u64) -> bool {
        match self {
            Filter::StatusCode(c, x) => c.test(u64::from(rec.response_code), *x),
            Filter::Duration(c, x) => c.test(rec.duration.map_or(0, |d| d.as_millis() as u64), *x),
            Filter::NotHealthCheck => !rec.is_health_check,
            Filter::Traceable => rec.trace_id.is_some(),
            Filter::Runtime(f) => f.hit(roll),
            Filter::And(fs) => fs.iter().all(|f| f.evaluate(rec, roll)),
            Filter::Or(fs) => fs.iter().any(|f| f.evaluate(rec, roll)),
            Filter::Header(m) => {
                let empty = http::HeaderMap::new();
                let get = http::Method::GET;
                m.matches(&RequestHead {
                    authority: rec.authority.unwrap_or(""),
                    path: rec.path.unwrap_or(""),
                    method: rec.method.unwrap_or(&get),
                    scheme: rec.scheme.unwrap_or("http"),
                    headers: rec.request_headers.and_then(|h| h.map()).unwrap_or(&empty),
                })
            }
            Filter::ResponseFlag(want) => {
                if want.is_empty() {
                    !rec.flags.is_empty()
                } else {
                    want.0 & rec.flags.0 != 0
                }
            }
        }
    }
}

/// One configured access logger.
#[derive(Debug, Clone)]
pub struct AccessLogger {
    /// `name`.
    pub name: String,
    /// `filter`.
    pub filter: Option<Filter>,
    /// The line format.
    pub format: Formatter,
    /// Where lines go.
    pub sink: Arc<Sink>,
}

/// Which headers of a request or response the loggers read: what the connection manager
/// keeps for the request's end (a few refcounted [`http::HeaderValue`] clones instead of a
/// copy of the whole map).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HeaderNeeds {
    /// None.
    #[default]
    Nothing,
    /// These (lower-case, no pseudo-headers).
    Some(Vec<http::HeaderName>),
    /// Every header (a header filter matches on the whole map).
    All,
}

impl HeaderNeeds {
    fn from_names(names: Vec<String>) -> Self {
        let names: Vec<http::HeaderName> = names
            .iter()
            .filter(|n| !n.starts_with(':'))
            .filter_map(|n| http::HeaderName::try_from(n.as_str()).ok())
            .collect();
        if names.is_empty() {
            HeaderNeeds::Nothing
        } else {
            HeaderNeeds::Some(names)
        }
    }

    /// Whether nothing is needed.
    pub fn is_nothing(&self) -> bool {
        matches!(self, HeaderNeeds::Nothing)
    }

    /// The needed part of `h` (`None` when nothing is).
    pub fn capture(&self, h: &http::HeaderMap) -> Option<KeptHeaders> {
        match self {
            HeaderNeeds::Nothing => None,
            HeaderNeeds::All => Some(KeptHeaders::Map(h.clone())),
            HeaderNeeds::Some(names) => {
                let mut out = Vec::with_capacity(names.len());
                for n in names {
                    for v in h.get_all(n) {
                        out.push((n.clone(), v.clone()));
                    }
                }
                Some(KeptHeaders::List(out))
            }
        }
    }
}

/// Headers the request end keeps for its log lines: the whole map when a header filter
/// matches on it, otherwise only the named headers a format reads, as pairs (values are
/// refcounted, not copied; a few pairs are cheaper to keep and to scan than a small
/// `HeaderMap` is to build and to look up, which hashes every name twice).
#[derive(Debug, Clone)]
pub enum KeptHeaders {
    /// Every header.
    Map(http::HeaderMap),
    /// The named ones.
    List(Vec<(http::HeaderName, http::HeaderValue)>),
}

impl KeptHeaders {
    /// What a [`LogRecord`] reads.
    pub fn view(&self) -> HeaderView<'_> {
        match self {
            KeptHeaders::Map(m) => HeaderView::Map(m),
            KeptHeaders::List(l) => HeaderView::List(l),
        }
    }
}

/// The access loggers of one connection manager or tcp_proxy.
#[derive(Debug, Clone, Default)]
pub struct AccessLogs {
    loggers: Vec<AccessLogger>,
    request_headers: HeaderNeeds,
    response_headers: HeaderNeeds,
}

impl AccessLogs {
    /// Loggers.
    pub fn new(loggers: Vec<AccessLogger>) -> Self {
        let (mut req, mut resp) = (Vec::new(), Vec::new());
        for l in &loggers {
            l.format.header_names(&mut req, &mut resp);
        }
        let request_headers = if loggers
            .iter()
            .any(|l| matches!(l.filter, Some(ref f) if needs_headers(f)))
        {
            HeaderNeeds::All
        } else {
            HeaderNeeds::from_names(req)
        };
        Self {
            loggers,
            request_headers,
            response_headers: HeaderNeeds::from_names(resp),
        }
    }

    /// Whether none is configured (the connection manager then records nothing).
    pub fn is_empty(&self) -> bool {
        self.loggers.is_empty()
    }

    /// Whether a format or filter reads request headers (keep a copy of them).
    pub fn needs_request_headers(&self) -> bool {
        !self.request_headers.is_nothing()
    }

    /// The request headers formats and filters read.
    pub fn request_headers(&self) -> &HeaderNeeds {
        &self.request_headers
    }

    /// The response headers and trailers formats read.
    pub fn response_headers(&self) -> &HeaderNeeds {
        &self.response_headers
    }

    /// The loggers.
    pub fn loggers(&self) -> &[AccessLogger] {
        &self.loggers
    }

    /// Log one request/connection to every logger whose filter accepts it. The line is
    /// rendered into a per-thread buffer and copied into the sink's flush buffer: no
    /// allocation per line.
    pub fn log(&self, rec: &LogRecord<'_>) {
        thread_local! {
            static LINE: std::cell::RefCell<String> = std::cell::RefCell::new(String::with_capacity(512));
        }
        for l in &self.loggers {
            if let Some(f) = &l.filter
                && !f.evaluate(rec, rand::random())
            {
                continue;
            }
            LINE.with(|line| match line.try_borrow_mut() {
                Ok(mut line) => {
                    line.clear();
                    l.format.render_into(rec, &mut line);
                    l.sink.write(&line);
                    if line.capacity() > 64 * 1024 {
                        // One huge line does not pin its memory to the thread.
                        *line = String::with_capacity(512);
                    }
                }
                // Not reentrant in practice; a nested call gets its own buffer.
                Err(_) => l.sink.write(&l.format.render(rec)),
            });
        }
    }
}

fn needs_headers(f: &Filter) -> bool {
    match f {
        Filter::Header(_) => true,
        Filter::And(fs) | Filter::Or(fs) => fs.iter().any(needs_headers),
        _ => false,
    }
}

const FILE_LOGGER: &str =
    "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";
const STDOUT_LOGGER: &str =
    "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";
const STDERR_LOGGER: &str =
    "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog";

/// Translate `access_log` entries at `path` (`hcm.access_log`).
pub fn translate(
    logs: &[alpb::AccessLog],
    path: &str,
    ctx: &TranslateCtx<'_>,
    errs: &mut Errors,
) -> AccessLogs {
    let mut out = Vec::new();
    for (i, l) in logs.iter().enumerate() {
        let p = format!("{path}[{i}]");
        if let Some(l) = translate_one(l, &p, ctx, errs) {
            out.push(l);
        }
    }
    AccessLogs::new(out)
}

// The legacy `format` / `json_format` fields are deprecated in Envoy but still honoured.
#[allow(deprecated)]
fn translate_one(
    l: &alpb::AccessLog,
    path: &str,
    ctx: &TranslateCtx<'_>,
    errs: &mut Errors,
) -> Option<AccessLogger> {
    errs.reject_unsupported(l, &["name", "filter", "typed_config"], path);
    let filter = l
        .filter
        .as_ref()
        .and_then(|f| translate_filter(f, &join(path, "filter"), ctx, errs));
    let tpath = join(path, "typed_config");
    let Some(alpb::access_log::ConfigType::TypedConfig(any)) = &l.config_type else {
        errs.add(tpath, "typed_config is required");
        return None;
    };
    let (target, format) = match any.type_url.as_str() {
        FILE_LOGGER => {
            let f: FileAccessLog = match weir_xds_api::unpack(any) {
                Ok(f) => f,
                Err(e) => {
                    errs.add(tpath, e.to_string());
                    return None;
                }
            };
            errs.reject_unsupported(
                &f,
                &[
                    "path",
                    "format",
                    "json_format",
                    "typed_json_format",
                    "log_format",
                ],
                &tpath,
            );
            if f.path.is_empty() {
                errs.add(join(&tpath, "path"), "path is required");
                return None;
            }
            let format = match &f.access_log_format {
                None => default_format(),
                Some(file_access_log::AccessLogFormat::Format(s)) => text_format(
                    if s.is_empty() {
                        format::DEFAULT_FORMAT
                    } else {
                        s
                    },
                    &join(&tpath, "format"),
                    errs,
                )?,
                Some(file_access_log::AccessLogFormat::JsonFormat(s)) => {
                    json_format(s, &join(&tpath, "json_format"), false, errs)?
                }
                Some(file_access_log::AccessLogFormat::TypedJsonFormat(s)) => {
                    json_format(s, &join(&tpath, "typed_json_format"), false, errs)?
                }
                Some(file_access_log::AccessLogFormat::LogFormat(s)) => {
                    substitution(s, &join(&tpath, "log_format"), errs)?
                }
            };
            (Target::File(f.path.clone()), format)
        }
        STDOUT_LOGGER => {
            let f: StdoutAccessLog = match weir_xds_api::unpack(any) {
                Ok(f) => f,
                Err(e) => {
                    errs.add(tpath, e.to_string());
                    return None;
                }
            };
            let format = match &f.access_log_format {
                None => default_format(),
                Some(stdout_access_log::AccessLogFormat::LogFormat(s)) => {
                    substitution(s, &join(&tpath, "log_format"), errs)?
                }
            };
            (Target::Stdout, format)
        }
        STDERR_LOGGER => {
            let f: StderrAccessLog = match weir_xds_api::unpack(any) {
                Ok(f) => f,
                Err(e) => {
                    errs.add(tpath, e.to_string());
                    return None;
                }
            };
            let format = match &f.access_log_format {
                None => default_format(),
                Some(stderr_access_log::AccessLogFormat::LogFormat(s)) => {
                    substitution(s, &join(&tpath, "log_format"), errs)?
                }
            };
            (Target::Stderr, format)
        }
        other => {
            errs.add(
                tpath,
                format!(
                    "unsupported access logger {other:?} (file, stdout and stderr are supported)"
                ),
            );
            return None;
        }
    };
    let sink = match Sink::shared(target.clone(), ctx.stats) {
        Ok(s) => s,
        Err(e) => {
            errs.add(join(&tpath, "path"), format!("cannot open {target:?}: {e}"));
            return None;
        }
    };
    Some(AccessLogger {
        name: l.name.clone(),
        filter,
        format,
        sink,
    })
}

fn default_format() -> Formatter {
    // The default format is a constant that parses (unit-tested).
    Formatter::Text(
        Format::parse(format::DEFAULT_FORMAT)
            .unwrap_or_else(|_| Format::literal(format::DEFAULT_FORMAT)),
    )
}

fn text_format(s: &str, path: &str, errs: &mut Errors) -> Option<Formatter> {
    match Format::parse(s) {
        Ok(f) => Some(Formatter::Text(f)),
        Err(e) => {
            errs.add(path, e.to_string());
            None
        }
    }
}

fn json_format(
    s: &weir_xds_api::pb::google::protobuf::Struct,
    path: &str,
    omit_empty: bool,
    errs: &mut Errors,
) -> Option<Formatter> {
    let v = struct_to_json(s);
    match JsonFormat::parse(&v) {
        Ok(f) => Some(Formatter::Json(f.omit_empty(omit_empty))),
        Err((k, e)) => {
            errs.add(format!("{path}{k}"), e.to_string());
            None
        }
    }
}

#[allow(deprecated)]
fn substitution(
    s: &core::SubstitutionFormatString,
    path: &str,
    errs: &mut Errors,
) -> Option<Formatter> {
    errs.reject_unsupported(
        s,
        &[
            "text_format",
            "json_format",
            "text_format_source",
            "omit_empty_values",
            "content_type",
        ],
        path,
    );
    use core::substitution_format_string::Format as F;
    match &s.format {
        None => Some(default_format()),
        Some(F::TextFormat(t)) => {
            text_format(t, &join(path, "text_format"), errs).map(|f| match f {
                Formatter::Text(f) => Formatter::Text(f.omit_empty(s.omit_empty_values)),
                other => other,
            })
        }
        Some(F::JsonFormat(j)) => {
            json_format(j, &join(path, "json_format"), s.omit_empty_values, errs)
        }
        Some(F::TextFormatSource(ds)) => {
            let p = join(path, "text_format_source");
            use core::data_source::Specifier;
            let text = match &ds.specifier {
                Some(Specifier::InlineString(t)) => t.clone(),
                Some(Specifier::InlineBytes(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(Specifier::Filename(f)) => match std::fs::read_to_string(f) {
                    Ok(t) => t,
                    Err(e) => {
                        errs.add(join(&p, "filename"), format!("cannot read {f:?}: {e}"));
                        return None;
                    }
                },
                _ => {
                    errs.add(p, "inline_string, inline_bytes or filename is required");
                    return None;
                }
            };
            text_format(&text, &p, errs).map(|f| match f {
                Formatter::Text(f) => Formatter::Text(f.omit_empty(s.omit_empty_values)),
                other => other,
            })
        }
    }
}

/// `google.protobuf.Struct` -> JSON.
fn struct_to_json(s: &weir_xds_api::pb::google::protobuf::Struct) -> serde_json::Value {
    use weir_xds_api::pb::google::protobuf::value::Kind;
    fn val(v: &weir_xds_api::pb::google::protobuf::Value) -> serde_json::Value {
        match &v.kind {
            None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
            Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
            Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
            Some(Kind::StructValue(s)) => struct_to_json(s),
            Some(Kind::ListValue(l)) => {
                serde_json::Value::Array(l.values.iter().map(val).collect())
            }
        }
    }
    serde_json::Value::Object(s.fields.iter().map(|(k, v)| (k.clone(), val(v))).collect())
}

fn comparison(
    c: Option<&alpb::ComparisonFilter>,
    path: &str,
    errs: &mut Errors,
) -> Option<(Cmp, u64)> {
    let Some(c) = c else {
        errs.add(join(path, "comparison"), "comparison is required");
        return None;
    };
    let cp = join(path, "comparison");
    errs.reject_unsupported(c, &["op", "value"], &cp);
    let op = match alpb::comparison_filter::Op::try_from(c.op) {
        Ok(alpb::comparison_filter::Op::Eq) => Cmp::Eq,
        Ok(alpb::comparison_filter::Op::Ge) => Cmp::Ge,
        Ok(alpb::comparison_filter::Op::Le) => Cmp::Le,
        Ok(alpb::comparison_filter::Op::Ne) => Cmp::Ne,
        Err(_) => {
            errs.add(join(&cp, "op"), "unknown comparison op");
            return None;
        }
    };
    let Some(v) = &c.value else {
        errs.add(join(&cp, "value"), "value is required");
        return None;
    };
    Some((op, u64::from(v.default_value)))
}

fn translate_filter(
    f: &alpb::AccessLogFilter,
    path: &str,
    ctx: &TranslateCtx<'_>,
    errs: &mut Errors,
) -> Option<Filter> {
    use alpb::access_log_filter::FilterSpecifier as S;
    match &f.filter_specifier {
        None => {
            errs.add(path, "a filter is required");
            None
        }
        Some(S::StatusCodeFilter(s)) => {
            let p = join(path, "status_code_filter");
            comparison(s.comparison.as_ref(), &p, errs).map(|(c, v)| Filter::StatusCode(c, v))
        }
        Some(S::DurationFilter(s)) => {
            let p = join(path, "duration_filter");
            comparison(s.comparison.as_ref(), &p, errs).map(|(c, v)| Filter::Duration(c, v))
        }
        Some(S::NotHealthCheckFilter(_)) => Some(Filter::NotHealthCheck),
        Some(S::TraceableFilter(_)) => Some(Filter::Traceable),
        Some(S::RuntimeFilter(r)) => {
            let p = join(path, "runtime_filter");
            errs.reject_unsupported(
                r,
                &[
                    "runtime_key",
                    "percent_sampled",
                    "use_independent_randomness",
                ],
                &p,
            );
            let mut fe = weir_filters::ConfigErrors::default();
            let frac = Fraction::translate(
                r.percent_sampled.as_ref(),
                Fraction::NONE,
                &join(&p, "percent_sampled"),
                &mut fe,
            );
            crate::route::filters::merge_errors(errs, fe);
            Some(Filter::Runtime(frac))
        }
        Some(S::AndFilter(a)) => {
            let p = join(path, "and_filter");
            let fs = sub_filters(&a.filters, &p, ctx, errs)?;
            Some(Filter::And(fs))
        }
        Some(S::OrFilter(a)) => {
            let p = join(path, "or_filter");
            let fs = sub_filters(&a.filters, &p, ctx, errs)?;
            Some(Filter::Or(fs))
        }
        Some(S::HeaderFilter(h)) => {
            let p = join(path, "header_filter");
            let Some(m) = &h.header else {
                errs.add(join(&p, "header"), "header is required");
                return None;
            };
            let fc = crate::route::filters::ProxyFactoryContext {
                ctx,
                hcm_prefix: "",
            };
            let mut fe = weir_filters::ConfigErrors::default();
            let out = weir_filters::FactoryContext::header_matchers(
                &fc,
                std::slice::from_ref(m),
                &join(&p, "header"),
                &mut fe,
            );
            // The matcher list's element path `[0]` is dropped: there is one header.
            for (ep, msg) in fe.0 {
                errs.add(ep.replacen("header[0]", "header", 1), msg);
            }
            out.map(Filter::Header)
        }
        Some(S::ResponseFlagFilter(r)) => {
            let p = join(path, "response_flag_filter");
            let mut set = ResponseFlags::default();
            for (i, c) in r.flags.iter().enumerate() {
                match Flag::from_code(c) {
                    Some(f) => set.set(f),
                    None => errs.add(
                        format!("{p}.flags[{i}]"),
                        format!("unknown response flag {c:?}"),
                    ),
                }
            }
            Some(Filter::ResponseFlag(set))
        }
        Some(_) => {
            errs.add(
                path,
                "unsupported access log filter (status_code, duration, not_health_check, traceable, \
                 runtime, and, or, header and response_flag filters are supported)",
            );
            None
        }
    }
}

fn sub_filters(
    fs: &[alpb::AccessLogFilter],
    path: &str,
    ctx: &TranslateCtx<'_>,
    errs: &mut Errors,
) -> Option<Vec<Filter>> {
    if fs.len() < 2 {
        errs.add(join(path, "filters"), "at least two filters are required");
    }
    let mut out = Vec::new();
    let before = errs.0.len();
    for (i, f) in fs.iter().enumerate() {
        if let Some(f) = translate_filter(f, &format!("{path}.filters[{i}]"), ctx, errs) {
            out.push(f);
        }
    }
    (errs.0.len() == before).then_some(out)
}

/// Reopen access log files on `SIGUSR1` (Envoy's log rotation signal). Call once per process.
pub fn spawn_reopen_on_sigusr1() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) {
            Ok(mut s) => {
                tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        tracing::info!("SIGUSR1: reopening access logs");
                        sink::reopen_all();
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot install SIGUSR1 handler"),
        }
    });
}

#[cfg(test)]
mod tests;
