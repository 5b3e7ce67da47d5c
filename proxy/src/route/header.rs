//! Header mutations (`*_headers_to_add` / `*_headers_to_remove`) at one level (route,
//! virtual host or route configuration), with Envoy's command operators in values.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderName, HeaderValue};
use weir_xds_api::pb::envoy::config::core::v3 as core;

use super::HeaderContext;
use crate::config::{Errors, join};

/// One piece of a header value template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    RemoteAddress,
    RemoteAddressWithoutPort,
    LocalAddress,
    LocalAddressWithoutPort,
    Protocol,
}

/// A header value: precompiled when it has no command operator.
#[derive(Debug)]
enum ValueTemplate {
    Static(HeaderValue),
    Dynamic(Vec<Segment>),
}

fn ip_of(a: &SocketAddr) -> String {
    a.ip().to_string()
}

impl ValueTemplate {
    /// The value for this request; `None` for an empty value (not added unless
    /// `keep_empty_value`).
    fn render(&self, ctx: &HeaderContext) -> Option<HeaderValue> {
        match self {
            ValueTemplate::Static(v) => Some(v.clone()),
            ValueTemplate::Dynamic(segs) => {
                let mut s = String::new();
                for seg in segs {
                    match seg {
                        Segment::Literal(l) => s.push_str(l),
                        Segment::RemoteAddress => s.push_str(&ctx.downstream_remote.to_string()),
                        Segment::RemoteAddressWithoutPort => {
                            s.push_str(&ip_of(&ctx.downstream_remote))
                        }
                        Segment::LocalAddress => s.push_str(&ctx.downstream_local.to_string()),
                        Segment::LocalAddressWithoutPort => {
                            s.push_str(&ip_of(&ctx.downstream_local))
                        }
                        Segment::Protocol => s.push_str(ctx.protocol),
                    }
                }
                // Literals were validated at translation and addresses/protocols are plain
                // ASCII, so this only fails on a broken HeaderContext; drop the header then.
                HeaderValue::from_str(&s).ok()
            }
        }
    }
}

/// Parse Envoy's header value format: `%OPERATOR%` command operators, `%%` for a literal `%`.
fn parse_template(value: &str) -> Result<Vec<Segment>, String> {
    let mut segs = Vec::new();
    let mut lit = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('%') {
        lit.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('%') {
            lit.push('%');
            rest = r;
            continue;
        }
        let Some(end) = after.find('%') else {
            return Err(format!(
                "unterminated command operator in {value:?} (write %% for a literal %)"
            ));
        };
        let op = &after[..end];
        let seg = match op {
            "DOWNSTREAM_REMOTE_ADDRESS" => Segment::RemoteAddress,
            "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Segment::RemoteAddressWithoutPort,
            "DOWNSTREAM_LOCAL_ADDRESS" => Segment::LocalAddress,
            "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => Segment::LocalAddressWithoutPort,
            "PROTOCOL" => Segment::Protocol,
            _ => {
                return Err(format!(
                    "command operator %{op}% is not supported by weir (supported: \
                     %DOWNSTREAM_REMOTE_ADDRESS%, %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%, \
                     %DOWNSTREAM_LOCAL_ADDRESS%, %DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%, \
                     %PROTOCOL%; write %% for a literal %)"
                ));
            }
        };
        if !lit.is_empty() {
            segs.push(Segment::Literal(std::mem::take(&mut lit)));
        }
        segs.push(seg);
        rest = &after[end + 1..];
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        segs.push(Segment::Literal(lit));
    }
    Ok(segs)
}

/// `HeaderValueOption.append_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

impl AppendAction {
    fn conditional(self) -> bool {
        matches!(
            self,
            AppendAction::AddIfAbsent | AppendAction::OverwriteIfExists
        )
    }
}

#[derive(Debug)]
struct HeaderAdd {
    name: HeaderName,
    value: ValueTemplate,
    action: AppendAction,
    keep_empty: bool,
}

/// The header mutations of one level.
#[derive(Debug, Default)]
pub(super) struct HeaderMutations {
    remove: Vec<HeaderName>,
    add: Vec<HeaderAdd>,
    /// Some entry depends on whether its header existed before this level was applied.
    conditional: bool,
}

/// Envoy's `isModifiableHeader`: not a pseudo-header, not `host`.
fn modifiable(name: &str) -> bool {
    !name.starts_with(':') && !name.eq_ignore_ascii_case("host")
}

fn header_name(name: &str, path: &str, errs: &mut Errors) -> Option<HeaderName> {
    if !modifiable(name) {
        errs.add(
            path,
            format!("{name:?}: pseudo-headers and host may not be modified or removed"),
        );
        return None;
    }
    match HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            errs.add(path, format!("{name:?} is not a valid header name"));
            None
        }
    }
}

impl HeaderMutations {
    /// Translate one level. `prefix` is the field prefix (`request` or `response`), so paths
    /// read `...request_headers_to_add[1].header.value`.
    pub(super) fn translate(
        add: &[core::HeaderValueOption],
        remove: &[String],
        path: &str,
        prefix: &str,
        errs: &mut Errors,
    ) -> HeaderMutations {
        let mut out = HeaderMutations::default();
        for (i, r) in remove.iter().enumerate() {
            let p = join(path, &format!("{prefix}_headers_to_remove[{i}]"));
            if let Some(h) = header_name(r, &p, errs) {
                out.remove.push(h);
            }
        }
        for (i, hvo) in add.iter().enumerate() {
            let p = join(path, &format!("{prefix}_headers_to_add[{i}]"));
            if let Some(a) = translate_option(hvo, &p, errs) {
                out.conditional |= a.action.conditional();
                out.add.push(a);
            }
        }
        out
    }

    /// Apply Envoy's `HeaderParser::evaluateHeaders`: removals first; then every addition is
    /// decided against the headers as they were after the removals; then overwrites are set,
    /// then appends are added.
    pub(super) fn apply(&self, headers: &mut HeaderMap, ctx: &HeaderContext) {
        for n in &self.remove {
            headers.remove(n);
        }
        if self.add.is_empty() {
            return;
        }
        let existed = Existed::snapshot(self, headers);
        // Overwrites first, then appends: each entry is rendered once, in its own pass.
        for overwrites in [true, false] {
            for (i, a) in self.add.iter().enumerate() {
                let wanted = match a.action {
                    AppendAction::OverwriteIfExistsOrAdd => overwrites,
                    AppendAction::OverwriteIfExists => overwrites && existed.get(i),
                    AppendAction::AppendIfExistsOrAdd => !overwrites,
                    AppendAction::AddIfAbsent => !overwrites && !existed.get(i),
                };
                if !wanted {
                    continue;
                }
                let Some(v) = a.value.render(ctx) else {
                    continue;
                };
                if v.is_empty() && !a.keep_empty {
                    continue;
                }
                if overwrites {
                    headers.insert(a.name.clone(), v);
                } else {
                    headers.append(a.name.clone(), v);
                }
            }
        }
    }
}

/// Which entries' headers existed before a level's additions (only for levels that have
/// `ADD_IF_ABSENT` / `OVERWRITE_IF_EXISTS` entries); no allocation up to 64 entries.
enum Existed {
    None,
    Bits(u64),
    Many(Vec<bool>),
}

impl Existed {
    fn snapshot(m: &HeaderMutations, headers: &HeaderMap) -> Existed {
        if !m.conditional {
            return Existed::None;
        }
        if m.add.len() <= 64 {
            let mut bits = 0u64;
            for (i, a) in m.add.iter().enumerate() {
                if headers.contains_key(&a.name) {
                    bits |= 1 << i;
                }
            }
            Existed::Bits(bits)
        } else {
            Existed::Many(
                m.add
                    .iter()
                    .map(|a| headers.contains_key(&a.name))
                    .collect(),
            )
        }
    }

    fn get(&self, i: usize) -> bool {
        match self {
            Existed::None => false,
            Existed::Bits(b) => i < 64 && b & (1 << i) != 0,
            Existed::Many(v) => v.get(i).copied().unwrap_or(false),
        }
    }
}

#[allow(deprecated)] // `append` is deprecated but still accepted, as in Envoy
fn translate_option(
    hvo: &core::HeaderValueOption,
    path: &str,
    errs: &mut Errors,
) -> Option<HeaderAdd> {
    use core::header_value_option::HeaderAppendAction as A;
    errs.reject_unsupported(
        hvo,
        &["header", "append", "append_action", "keep_empty_value"],
        path,
    );
    let hp = join(path, "header");
    let Some(hv) = &hvo.header else {
        errs.add(hp, "header is required");
        return None;
    };
    errs.reject_unsupported(hv, &["key", "value"], &hp);
    let name = header_name(&hv.key, &join(&hp, "key"), errs);
    let vp = join(&hp, "value");
    let value = match parse_template(&hv.value) {
        Err(e) => {
            errs.add(&vp, e);
            None
        }
        Ok(segs) => {
            let ok = segs.iter().all(|s| match s {
                Segment::Literal(l) => HeaderValue::from_str(l).is_ok(),
                _ => true,
            });
            if !ok {
                errs.add(&vp, format!("{:?} is not a valid header value", hv.value));
            }
            match segs.as_slice() {
                _ if !ok => None,
                [] => Some(ValueTemplate::Static(HeaderValue::from_static(""))),
                [Segment::Literal(l)] => HeaderValue::from_str(l).ok().map(ValueTemplate::Static),
                _ => Some(ValueTemplate::Dynamic(segs)),
            }
        }
    };
    let action = if hvo.append.is_some() && hvo.append_action != A::AppendIfExistsOrAdd as i32 {
        errs.add(
            join(path, "append"),
            "append and append_action are mutually exclusive",
        );
        AppendAction::AppendIfExistsOrAdd
    } else if let Some(b) = &hvo.append {
        if b.value {
            AppendAction::AppendIfExistsOrAdd
        } else {
            AppendAction::OverwriteIfExistsOrAdd
        }
    } else {
        match A::try_from(hvo.append_action) {
            Ok(A::AppendIfExistsOrAdd) => AppendAction::AppendIfExistsOrAdd,
            Ok(A::AddIfAbsent) => AppendAction::AddIfAbsent,
            Ok(A::OverwriteIfExistsOrAdd) => AppendAction::OverwriteIfExistsOrAdd,
            Ok(A::OverwriteIfExists) => AppendAction::OverwriteIfExists,
            Err(_) => {
                errs.add(join(path, "append_action"), "unknown append_action");
                AppendAction::AppendIfExistsOrAdd
            }
        }
    };
    Some(HeaderAdd {
        name: name?,
        value: value?,
        action,
        keep_empty: hvo.keep_empty_value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_parsing() {
        assert_eq!(parse_template(""), Ok(vec![]));
        assert_eq!(
            parse_template("a%%b"),
            Ok(vec![Segment::Literal("a%b".into())])
        );
        assert_eq!(
            parse_template("ip=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%;p=%PROTOCOL%"),
            Ok(vec![
                Segment::Literal("ip=".into()),
                Segment::RemoteAddressWithoutPort,
                Segment::Literal(";p=".into()),
                Segment::Protocol,
            ])
        );
        assert_eq!(
            parse_template("%DOWNSTREAM_LOCAL_ADDRESS%%%"),
            Ok(vec![Segment::LocalAddress, Segment::Literal("%".into())])
        );
        assert!(parse_template("%UPSTREAM_CLUSTER%").is_err());
        assert!(parse_template("100%").is_err());
        assert!(parse_template("%START_TIME(%s)%").is_err());
    }
}
