//! Finds the protobuf descriptor set that `envoy-types` ships next to its generated code
//! (`src/generated/types.bin`) and copies it into OUT_DIR.
//!
//! Why: YAML/JSON bootstrap files and `/config_dump` need the proto3 JSON mapping, which in
//! Rust means `prost-reflect` over a descriptor pool. `envoy-types` generates its Rust types
//! from exactly that descriptor set but does not export it, so we read the file from the
//! crate's own package at build time instead of copying any .proto or descriptor into this
//! repository. Lookup order: `WEIR_ENVOY_DESCRIPTORS` (explicit path, e.g. for vendored
//! builds), then every registry source directory under `$CARGO_HOME`, then `cargo metadata`.
use std::path::{Path, PathBuf};

const CRATE_DIR: &str = "envoy-types-0.7.7";
const REL: &str = "src/generated/types.bin";

fn main() {
    println!("cargo:rerun-if-env-changed=WEIR_ENVOY_DESCRIPTORS");
    println!("cargo:rerun-if-changed=build.rs");
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("envoy_descriptors.bin");
    let found = explicit().or_else(registry_scan).or_else(cargo_metadata);
    match found {
        Some(p) => {
            println!("cargo:rerun-if-changed={}", p.display());
            std::fs::copy(&p, &out).expect("copy envoy descriptor set");
        }
        None => panic!(
            "could not find {CRATE_DIR}/{REL}; set WEIR_ENVOY_DESCRIPTORS to its path \
             (it ships inside the envoy-types crate package)"
        ),
    }
}

fn explicit() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("WEIR_ENVOY_DESCRIPTORS")?);
    p.exists().then_some(p)
}

fn registry_scan() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
    let src = home.join("registry").join("src");
    for entry in std::fs::read_dir(src).ok()?.flatten() {
        let p = entry.path().join(CRATE_DIR).join(REL);
        if p.exists() {
            return Some(p);
        }
    }
    None
}

fn cargo_metadata() -> Option<PathBuf> {
    let cargo = std::env::var("CARGO").ok()?;
    let dir = std::env::var("CARGO_MANIFEST_DIR").ok()?;
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1"])
        .current_dir(dir)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Find `".../envoy-types-0.7.7/Cargo.toml"` without a JSON dependency in the build script.
    let idx = text.find(&format!("{CRATE_DIR}/Cargo.toml"))?;
    let start = text[..idx].rfind('"')? + 1;
    let manifest = PathBuf::from(&text[start..idx + CRATE_DIR.len()]);
    let p = manifest.join(REL);
    p.exists().then_some(p)
}
