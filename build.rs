// Link arguments for the shared library. On ELF systems (Linux, the BSDs) it gets a soname,
// libwsclient.so.MAJOR, so that programs linked against libwsclient.so record that name and a
// future incompatible ABI can be installed beside it; on macOS the same through its install name.
// Only the `ws_*` functions are exported: rustc's own export list for a cdylib already hides
// everything else (tests/install.rs checks it with nm).
fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "macos" || os == "ios" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-install_name,@rpath/libwsclient.{major}.dylib");
    } else if os != "windows" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libwsclient.so.{major}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
