// Gives the shared library a soname, so that programs linked against libwsclient.so record
// libwsclient.so.0 and a future incompatible ABI can be installed beside it.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libwsclient.so.0");
    println!("cargo:rerun-if-changed=build.rs");
}
