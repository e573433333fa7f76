//! The committed include/wsclient.h must be exactly what cbindgen makes of the sources now.
//! Run with WSCLIENT_UPDATE_HEADER=1 (as `make header` does) to rewrite it.

use std::path::Path;

#[test]
fn committed_header_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(root)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let path = root.join("include/wsclient.h");
    if std::env::var_os("WSCLIENT_UPDATE_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("write include/wsclient.h");
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(committed == generated, "include/wsclient.h is stale: run `make header` and commit it");
}

#[test]
fn header_version_macros_match_cargo_toml() {
    let header = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("include/wsclient.h")).unwrap();
    for (name, value) in [
        ("MAJOR", env!("CARGO_PKG_VERSION_MAJOR")),
        ("MINOR", env!("CARGO_PKG_VERSION_MINOR")),
        ("PATCH", env!("CARGO_PKG_VERSION_PATCH")),
    ] {
        let line = format!("#define WSCLIENT_VERSION_{name} {value}\n");
        assert!(header.contains(&line), "header lacks {line:?}: update after_includes in cbindgen.toml");
    }
    let version = env!("CARGO_PKG_VERSION");
    let line = format!("#define WSCLIENT_VERSION \"{version}\"\n");
    assert!(header.contains(&line), "header lacks {line:?}: update after_includes in cbindgen.toml");
    let part = |s: &str| s.parse::<u32>().unwrap();
    let number = (part(env!("CARGO_PKG_VERSION_MAJOR")) << 16)
        | (part(env!("CARGO_PKG_VERSION_MINOR")) << 8)
        | part(env!("CARGO_PKG_VERSION_PATCH"));
    let line = format!("#define WSCLIENT_VERSION_NUMBER {number:#08x}\n");
    assert!(header.contains(&line), "header lacks {line:?}: update after_includes in cbindgen.toml");

    let runtime = unsafe { std::ffi::CStr::from_ptr(wsclient::ffi::client::ws_version()) };
    assert_eq!(runtime.to_str().unwrap(), version);
    assert_eq!(wsclient::ffi::client::ws_version_number(), number);
}

/// Every public item of the header carries a doc comment.
#[test]
fn every_header_item_is_documented() {
    let header = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("include/wsclient.h")).unwrap();
    let lines: Vec<&str> = header.lines().collect();
    let mut undocumented = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let starts_item = line.starts_with("typedef struct")
            || line.starts_with("typedef void (*")
            || line.starts_with("typedef uint64_t")
            || line.starts_with("enum ws_")
            || (line.starts_with("  WS_") && line.contains(" = "))
            || (!line.starts_with(' ') && line.contains(" ws_") && line.contains('(') && !line.starts_with("typedef"));
        if !starts_item {
            continue;
        }
        let previous = lines[..i].iter().rev().find(|l| !l.trim().is_empty()).map(|l| l.trim()).unwrap_or("");
        if !(previous.ends_with("*/")) {
            undocumented.push(*line);
        }
    }
    assert!(undocumented.is_empty(), "undocumented header items: {undocumented:#?}");
}
