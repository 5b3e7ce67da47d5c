//! # weir-xds-api
//!
//! Envoy's xDS v3 wire types and the helpers weir needs at its config border.
//!
//! Layout:
//! - [`pb`]: every Envoy v3 message (re-exported from the maintained `envoy-types` crate; no
//!   .proto file is copied into this repository).
//! - [`pool`]: the protobuf descriptor pool for those messages, used for the proto3 JSON
//!   mapping (Envoy's YAML/JSON config files, `/config_dump`).
//! - [`from_yaml`] / [`from_json_value`]: parse Envoy YAML or JSON into a typed message,
//!   resolving `@type`-tagged `Any` fields, with errors that name the field path.
//! - [`to_json`] / [`any_to_json`]: render a message back to proto3 JSON (config dumps).
//! - [`type_urls`]: the type URLs weir recognises, and [`unpack`] / [`pack`] for `Any`.
#![forbid(unsafe_code)]

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};

pub use envoy_types::pb;
pub use pb::google::protobuf::Any;
pub use prost;

pub mod type_urls;

static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

/// The descriptor pool of every message in [`pb`].
pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        // The bytes are produced by envoy-types' own build and checked at weir's build time
        // by the unit tests below; failure here is a build defect, not an input error.
        DescriptorPool::decode(DESCRIPTORS)
            .expect("envoy descriptor set shipped with envoy-types decodes")
    })
}

/// An error turning text into a typed Envoy message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The text is not valid YAML/JSON.
    #[error("{0}")]
    Syntax(String),
    /// The document does not match the message schema; `path` names the offending field.
    #[error("{path}: {message}")]
    Schema {
        /// Dotted field path (`static_resources.listeners[0].address`).
        path: String,
        /// What is wrong there.
        message: String,
    },
    /// The message type is unknown to the descriptor pool (a weir bug, or an `@type` typo).
    #[error("unknown message type {0}")]
    UnknownType(String),
    /// The reflected message did not decode into the typed one (should not happen).
    #[error("internal decode error: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// Parse Envoy YAML (or JSON, which is YAML) into `T`.
pub fn from_yaml<T: prost::Message + prost::Name + Default>(text: &str) -> Result<T, ParseError> {
    let value: serde_json::Value =
        serde_yaml::from_str(text).map_err(|e| ParseError::Syntax(e.to_string()))?;
    from_json_value(value)
}

/// Parse a proto3-JSON value into `T`. Unknown fields are errors (Envoy rejects them too).
pub fn from_json_value<T: prost::Message + prost::Name + Default>(
    value: serde_json::Value,
) -> Result<T, ParseError> {
    let desc = pool()
        .get_message_by_name(&T::full_name())
        .ok_or_else(|| ParseError::UnknownType(T::full_name()))?;
    let opts = DeserializeOptions::new().deny_unknown_fields(true);
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(value, &mut track);
    let msg = match DynamicMessage::deserialize_with_options(desc, de, &opts) {
        Ok(m) => m,
        Err(e) => {
            let path = track.path().to_string();
            return Err(ParseError::Schema {
                path: snake_path(&path),
                message: e.to_string(),
            });
        }
    };
    let bytes = prost::Message::encode_to_vec(&msg);
    Ok(T::decode(bytes.as_slice())?)
}

/// Envoy accepts camelCase and snake_case; report paths in snake_case (the proto field names).
fn snake_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 8);
    let mut in_quote = false;
    for c in path.chars() {
        if c == '"' || c == '\'' {
            in_quote = !in_quote;
        }
        if !in_quote && c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    if out == "." { String::new() } else { out }
}

/// Render a typed message as proto3 JSON (snake_case field names, as Envoy's config_dump).
pub fn to_json<T: prost::Message + prost::Name>(msg: &T) -> serde_json::Value {
    let Some(desc) = pool().get_message_by_name(&T::full_name()) else {
        return serde_json::Value::Null;
    };
    encode_json(desc, &msg.encode_to_vec())
}

/// Render an `Any` as proto3 JSON with its `@type`.
pub fn any_to_json(any: &Any) -> serde_json::Value {
    let Some(desc) = pool().get_message_by_name("google.protobuf.Any") else {
        return serde_json::Value::Null;
    };
    encode_json(desc, &prost::Message::encode_to_vec(any))
}

fn encode_json(desc: prost_reflect::MessageDescriptor, bytes: &[u8]) -> serde_json::Value {
    let Ok(msg) = DynamicMessage::decode(desc, bytes) else {
        return serde_json::Value::Null;
    };
    let opts = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(true);
    // Serialization into a Value only fails for unresolvable Any types; show them opaquely.
    msg.serialize_with_options(serde_json::value::Serializer, &opts)
        .unwrap_or(serde_json::Value::Null)
}

/// Names of the fields of `msg` that are set (non-default in proto3, present for
/// message/optional fields). Translation code compares them against the fields weir supports,
/// so an unsupported field that would change behaviour is an error rather than ignored.
pub fn set_fields<T: prost::Message + prost::Name>(msg: &T) -> Vec<String> {
    let Some(desc) = pool().get_message_by_name(&T::full_name()) else {
        return Vec::new();
    };
    let bytes = msg.encode_to_vec();
    // prost encodes exactly the set fields (proto3 scalars at their default are omitted,
    // present messages and oneof members are written), so the top-level tags of the encoding
    // name them. Reading only the tags (skipping values) keeps this cheap for messages that
    // are translated by the thousand (EDS endpoints).
    match top_level_field_numbers(&bytes) {
        // In descriptor order, as DynamicMessage lists them.
        Some(numbers) => desc
            .fields()
            .filter(|f| numbers.contains(&f.number()))
            .map(|f| f.name().to_string())
            .collect(),
        None => match DynamicMessage::decode(desc, bytes.as_slice()) {
            Ok(dm) => dm.fields().map(|(f, _)| f.name().to_string()).collect(),
            Err(_) => Vec::new(),
        },
    }
}

/// The distinct field numbers of an encoded message's top level, in first-seen order, or
/// `None` if the bytes are not a well-formed encoding without groups.
fn top_level_field_numbers(mut buf: &[u8]) -> Option<Vec<u32>> {
    use prost::encoding::decode_varint;
    let mut out: Vec<u32> = Vec::new();
    while !buf.is_empty() {
        let key = decode_varint(&mut buf).ok()?;
        let number = u32::try_from(key >> 3).ok()?;
        let skip = match key & 7 {
            0 => {
                decode_varint(&mut buf).ok()?;
                0
            }
            1 => 8,
            2 => usize::try_from(decode_varint(&mut buf).ok()?).ok()?,
            5 => 4,
            _ => return None,
        };
        buf = buf.get(skip..)?;
        if number == 0 {
            return None;
        }
        if !out.contains(&number) {
            out.push(number);
        }
    }
    Some(out)
}

/// Pack a message into an `Any`.
pub fn pack<T: prost::Message + prost::Name>(msg: &T) -> Any {
    Any {
        type_url: T::type_url(),
        value: msg.encode_to_vec(),
    }
}

/// An `Any` held a different type than the caller expected, or did not decode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UnpackError {
    /// `type_url` differs from the expected message.
    #[error("expected {expected}, got {got}")]
    TypeMismatch {
        /// The type URL expected.
        expected: String,
        /// The type URL found.
        got: String,
    },
    /// The bytes are not a valid message of that type.
    #[error("invalid {type_url}: {source}")]
    Decode {
        /// The type URL.
        type_url: String,
        /// The protobuf error.
        source: prost::DecodeError,
    },
}

/// Unpack an `Any` into `T`, checking the type URL.
pub fn unpack<T: prost::Message + prost::Name + Default>(any: &Any) -> Result<T, UnpackError> {
    let expected = T::type_url();
    if any.type_url != expected {
        return Err(UnpackError::TypeMismatch {
            expected,
            got: any.type_url.clone(),
        });
    }
    T::decode(any.value.as_slice()).map_err(|source| UnpackError::Decode {
        type_url: expected,
        source,
    })
}

/// The message name of a type URL (`type.googleapis.com/a.b.C` -> `a.b.C`).
pub fn type_name(type_url: &str) -> &str {
    type_url
        .rsplit_once('/')
        .map(|(_, n)| n)
        .unwrap_or(type_url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::envoy::config::bootstrap::v3::Bootstrap;
    use pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;

    #[test]
    fn pool_has_bootstrap_and_extensions() {
        assert!(
            pool()
                .get_message_by_name("envoy.config.bootstrap.v3.Bootstrap")
                .is_some()
        );
        for url in type_urls::ALL {
            assert!(
                pool().get_message_by_name(type_name(url)).is_some(),
                "{url}"
            );
        }
    }

    #[test]
    fn yaml_with_typed_config_roundtrips() {
        let b: Bootstrap = from_yaml(
            r#"
static_resources:
  listeners:
  - name: l
    address: {socketAddress: {address: 127.0.0.1, port_value: 10000}}
    filter_chains:
    - filters:
      - name: tcp
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: c
          idle_timeout: 1.5s
"#,
        )
        .expect("parses");
        let l = &b.static_resources.as_ref().expect("static").listeners[0];
        let f = &l.filter_chains[0].filters[0];
        let Some(pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any)) =
            &f.config_type
        else {
            panic!("typed config")
        };
        let tp: TcpProxy = unpack(any).expect("unpack");
        assert_eq!(tp.stat_prefix, "tcp");
        let d = tp.idle_timeout.expect("idle");
        assert_eq!((d.seconds, d.nanos), (1, 500_000_000));
        let json = to_json(&b);
        assert_eq!(
            json["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
                ["cluster"],
            "c"
        );
    }

    #[test]
    fn set_fields_matches_a_full_decode() {
        use crate::pb::envoy::config::cluster::v3::Cluster;
        use prost::Message as _;
        let c: Cluster = from_yaml(
            "name: c\ntype: EDS\nconnect_timeout: 0s\nlb_policy: RING_HASH\neds_cluster_config: {}\nper_connection_buffer_limit_bytes: 0\nload_assignment: {cluster_name: c, endpoints: [{lb_endpoints: [{}]}, {}]}\n",
        )
        .expect("cluster");
        let desc = pool()
            .get_message_by_name("envoy.config.cluster.v3.Cluster")
            .expect("descriptor");
        let full: Vec<String> = DynamicMessage::decode(desc, c.encode_to_vec().as_slice())
            .expect("decode")
            .fields()
            .map(|(f, _)| f.name().to_string())
            .collect();
        assert_eq!(set_fields(&c), full);
        assert!(full.contains(&"per_connection_buffer_limit_bytes".to_string()));
        assert_eq!(top_level_field_numbers(&[0x08]), None, "truncated varint");
        assert_eq!(
            top_level_field_numbers(&[0x0a, 0x05, 0x01]),
            None,
            "short length"
        );
        assert_eq!(
            top_level_field_numbers(&[0x08, 0x01, 0x08, 0x02]),
            Some(vec![1])
        );
    }

    #[test]
    fn set_fields_lists_only_present_fields() {
        let tp = TcpProxy {
            stat_prefix: "x".into(),
            ..Default::default()
        };
        assert_eq!(set_fields(&tp), vec!["stat_prefix".to_string()]);
        assert!(set_fields(&TcpProxy::default()).is_empty());
    }

    #[test]
    fn errors_name_the_field_path() {
        let err = from_yaml::<Bootstrap>(
            "static_resources:\n  listeners:\n  - name: l\n    bogus_field: 1\n",
        )
        .expect_err("unknown field");
        let s = err.to_string();
        assert!(s.starts_with("static_resources.listeners[0]"), "{s}");
        assert!(s.contains("bogus_field"), "{s}");
        let err = from_yaml::<Bootstrap>(
            "staticResources:\n  listeners:\n  - perConnectionBufferLimitBytes: x\n",
        )
        .expect_err("bad type");
        assert!(
            err.to_string()
                .starts_with("static_resources.listeners[0].per_connection_buffer_limit_bytes"),
            "{err}"
        );
        assert!(matches!(
            from_yaml::<Bootstrap>("a: [").expect_err("syntax"),
            ParseError::Syntax(_)
        ));
    }
}
