//! `admission.k8s.io/v1` `AdmissionReview`: the few fields the injector reads and writes,
//! written here rather than taken from k8s-openapi (a very large crate for five structs).
//! Unknown fields are ignored (the API server adds fields over releases); the pod itself is
//! kept as JSON so nothing in it is lost or reordered by a round trip.

use serde::{Deserialize, Serialize};

/// The only `apiVersion` served (`v1beta1` was removed in Kubernetes 1.22).
pub const API_VERSION: &str = "admission.k8s.io/v1";
/// `kind` of requests and responses.
pub const KIND: &str = "AdmissionReview";

/// A review as the API server sends it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    /// Must be [`API_VERSION`].
    pub api_version: String,
    /// Must be [`KIND`].
    pub kind: String,
    /// The request (absent only in responses).
    #[serde(default)]
    pub request: Option<AdmissionRequest>,
}

/// `request`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    /// Echoed in the response.
    pub uid: String,
    /// The object's kind (`""/v1/Pod` for pods).
    pub kind: GroupVersionKind,
    /// The object's namespace (set for pods even when `object.metadata.namespace` is not).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The object's name (empty for pods created with `generateName`).
    #[serde(default)]
    pub name: Option<String>,
    /// `CREATE`, `UPDATE`, `DELETE` or `CONNECT`.
    pub operation: String,
    /// The object being admitted.
    #[serde(default)]
    pub object: Option<serde_json::Value>,
    /// A dry run: no side effects (the injector has none anyway).
    #[serde(default)]
    pub dry_run: Option<bool>,
}

/// `request.kind`.
#[derive(Debug, Clone, Deserialize)]
pub struct GroupVersionKind {
    /// `""` for the core group.
    #[serde(default)]
    pub group: String,
    /// `v1`.
    pub version: String,
    /// `Pod`.
    pub kind: String,
}

/// The answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReviewResponse {
    /// [`API_VERSION`].
    pub api_version: &'static str,
    /// [`KIND`].
    pub kind: &'static str,
    /// The response.
    pub response: AdmissionResponse,
}

/// `response`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    /// The request's uid.
    pub uid: String,
    /// Always true: the injector mutates, it never blocks a pod.
    pub allowed: bool,
    /// `JSONPatch` when `patch` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<&'static str>,
    /// Base64 of the RFC 6902 JSON Patch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// Shown to the client (`kubectl` prints them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl AdmissionReviewResponse {
    /// Wrap `response`.
    pub fn new(response: AdmissionResponse) -> Self {
        AdmissionReviewResponse {
            api_version: API_VERSION,
            kind: KIND,
            response,
        }
    }
}
