# wsclient: build, install, test and demo. `make demo` and `make test` do all the set-up they
# need; plain `make` only builds (it never installs system packages: packagers build offline).
CARGO ?= cargo
CC ?= cc
CXX ?= c++
CFLAGS ?= -O2 -g
WARN := -std=c11 -Wall -Wextra -Wpedantic -Werror
# Where cargo leaves the release build.
RELEASE := target/release
# The version, from Cargo.toml (also in the header and behind ws_version(); tests check they agree).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
MAJOR := $(firstword $(subst ., ,$(VERSION)))
BUILD := examples-c/build
EXAMPLES := $(BUILD)/echo $(BUILD)/flow $(BUILD)/many $(BUILD)/bench $(BUILD)/wsjs
# Debian packages the tests and examples need (installed by `make deps` when root): tinyproxy and
# microsocks are the proxies of the proxy tests; openssl makes the RSA and PKCS#1/SEC1 keys of the
# client certificate tests.
DEB_PACKAGES := valgrind pkg-config duktape-dev tinyproxy microsocks openssl

VENV := .venv
PEER_PYTHON := $(VENV)/bin/python

.PHONY: all lib examples deps peers test lint demo bench bench-memory header clean fuzz fuzz-smoke fuzz-tools asan install uninstall

# The shared benchmark harness: beside this repository (as in CI), else set SHARED=DIR.
SHARED ?= $(abspath ../shared)

all: lib examples

# The library (libwsclient.so with soname libwsclient.so.MAJOR, libwsclient.a) and the bundled
# test server. The soname link lets programs linked here run from the build tree.
lib:
	$(CARGO) build --release --lib --example testserver
	ln -sf libwsclient.so $(RELEASE)/libwsclient.so.$(MAJOR)

examples: $(EXAMPLES)

$(BUILD):
	mkdir -p $@

# wsjs embeds Duktape (Debian's duktape-dev, found with pkg-config).
$(BUILD)/wsjs: examples-c/wsjs.c include/wsclient.h lib | $(BUILD)
	$(CC) $(WARN) $(CFLAGS) -Iinclude $$(pkg-config --cflags duktape) $< -o $@ \
	  -L$(RELEASE) -lwsclient -Wl,-rpath,$(abspath $(RELEASE)) $$(pkg-config --libs duktape) -lm

$(BUILD)/%: examples-c/%.c include/wsclient.h lib | $(BUILD)
	$(CC) $(WARN) $(CFLAGS) -Iinclude $< -o $@ -L$(RELEASE) -lwsclient -Wl,-rpath,$(abspath $(RELEASE))

deps:
	@missing=""; \
	for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	python3 -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing"; echo "install them with: sudo apt-get install$$missing"; exit 1; \
	  fi; \
	fi

# The independent test peers: Python's websockets in a local virtualenv, Node's ws in
# tests/peers/node_modules, both pinned.
peers: $(VENV)/.installed tests/peers/node_modules/.installed
tests/peers/node_modules/.installed: tests/peers/package.json tests/peers/package-lock.json
	cd tests/peers && npm ci --no-audit --no-fund --silent
	touch $@
$(VENV)/.installed: tests/peers/requirements.txt
	python3 -m venv $(VENV)
	$(PEER_PYTHON) -m pip install -q -r tests/peers/requirements.txt
	touch $@

# Installing (ELF systems: Linux and the BSDs): the shared library as libwsclient.so.VERSION
# with the soname link libwsclient.so.MAJOR and the development link libwsclient.so, the static
# library, the header and a pkg-config file. DESTDIR is prepended to every path (for packagers);
# the paths written into wsclient.pc are without it.
PREFIX ?= /usr/local
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
INSTALL ?= install
OBJCOPY ?= objcopy
# The installed libraries lose the debug info (15 of the shared library's 18 MB even with line
# tables only: inlining records and std's own debug info come along) but keep their symbol
# tables, so backtraces still name functions; `make install STRIP_DEBUG=` keeps it, for a
# packager who splits it into a debug package. The LLVM bitcode that rustc leaves in the static
# library is always removed: a C linker ignores it.
STRIP_DEBUG ?= --strip-debug

# The system libraries a static link needs, as rustc reports them for our static library
# (--print native-static-libs). It prints them only when it compiles, so they are asked of a
# build of its own (a debug build in target/native-libs, once; cargo replays the note after):
# asking the release build would make it rebuild whenever it is built without the flag.
$(RELEASE)/native-static-libs: Cargo.toml Cargo.lock build.rs
	@mkdir -p $(RELEASE)
	log=$@.$$$$.log; \
	$(CARGO) rustc --lib --crate-type staticlib --target-dir target/native-libs -- --print native-static-libs \
	  2>$$log || { cat $$log; rm -f $$log; exit 1; }; \
	libs=$$(sed -n 's/^note: native-static-libs: //p' $$log | tail -n 1); \
	if test -z "$$libs"; then cat $$log; rm -f $$log; echo "rustc reported no native-static-libs"; exit 1; fi; \
	rm -f $$log; echo "$$libs" > $@.$$$$ && mv $@.$$$$ $@

# wsclient.pc names the paths under PREFIX relative to ${prefix}, as pkg-config files do.
install: lib $(RELEASE)/native-static-libs
	$(INSTALL) -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(PKGCONFIGDIR)
	$(OBJCOPY) $(STRIP_DEBUG) $(RELEASE)/libwsclient.so $(DESTDIR)$(LIBDIR)/libwsclient.so.$(VERSION)
	chmod 755 $(DESTDIR)$(LIBDIR)/libwsclient.so.$(VERSION)
	ln -sf libwsclient.so.$(VERSION) $(DESTDIR)$(LIBDIR)/libwsclient.so.$(MAJOR)
	ln -sf libwsclient.so.$(MAJOR) $(DESTDIR)$(LIBDIR)/libwsclient.so
	$(OBJCOPY) $(STRIP_DEBUG) --remove-section=.llvmbc --remove-section=.llvmcmd \
	  $(RELEASE)/libwsclient.a $(DESTDIR)$(LIBDIR)/libwsclient.a
	chmod 644 $(DESTDIR)$(LIBDIR)/libwsclient.a
	$(INSTALL) -m 644 include/wsclient.h $(DESTDIR)$(INCLUDEDIR)/wsclient.h
	sed -e 's|@PREFIX@|$(PREFIX)|' \
	  -e 's|@LIBDIR@|$(patsubst $(PREFIX)/%,$${prefix}/%,$(LIBDIR))|' \
	  -e 's|@INCLUDEDIR@|$(patsubst $(PREFIX)/%,$${prefix}/%,$(INCLUDEDIR))|' \
	  -e 's|@VERSION@|$(VERSION)|' \
	  -e "s|@LIBS_PRIVATE@|$$(cat $(RELEASE)/native-static-libs)|" \
	  wsclient.pc.in > $(DESTDIR)$(PKGCONFIGDIR)/wsclient.pc
	chmod 644 $(DESTDIR)$(PKGCONFIGDIR)/wsclient.pc

uninstall:
	rm -f $(DESTDIR)$(LIBDIR)/libwsclient.so.$(VERSION) $(DESTDIR)$(LIBDIR)/libwsclient.so.$(MAJOR) \
	  $(DESTDIR)$(LIBDIR)/libwsclient.so $(DESTDIR)$(LIBDIR)/libwsclient.a \
	  $(DESTDIR)$(INCLUDEDIR)/wsclient.h $(DESTDIR)$(PKGCONFIGDIR)/wsclient.pc

# Every test: Rust unit and integration tests (the C functions against local servers, ws and
# wss), the header check, the C examples under valgrind (run by tests/c_examples.rs), the
# install test (tests/install.rs), then the unit tests, the C API's semantics and the epoll
# hosts (level- and edge-triggered, declared or not) again with the wake-up descriptor as a pipe
# (the macOS and BSD path, `pipe-wake`), and a
# short run of each fuzz target where the nightly toolchain exists.
test: deps all peers lint
	$(CARGO) test -- --test-threads=4
	$(CARGO) test --features pipe-wake --lib --test semantics -- --test-threads=4
	$(CARGO) test --features pipe-wake --test hostile_round2 -- epoll declared --test-threads=4
	$(CARGO) test --features pipe-wake --test attack_edge -- --test-threads=2
	$(MAKE) fuzz-smoke

# Fuzzing (cargo-fuzz, libFuzzer, nightly): the frame reader cut at random points, the upgrade
# response parser and URI parsing (fuzz/fuzz_targets/, invariants in src/testing.rs). Each target
# runs FUZZ_SECONDS from the committed seeds (fuzz/corpus/TARGET, written by fuzz/seeds.py);
# what the fuzzer adds goes to fuzz/target/corpus/TARGET, a crash to fuzz/artifacts/TARGET.
# Built with debug assertions and overflow checks, under AddressSanitizer (cargo-fuzz's default).
NIGHTLY ?= +nightly
FUZZ_SECONDS ?= 600
FUZZ_SMOKE_SECONDS ?= 20
FUZZ_TARGETS := frames upgrade_response uri deflate

fuzz-tools:
	@$(CARGO) $(NIGHTLY) --version >/dev/null 2>&1 || { echo "make fuzz needs the nightly toolchain: rustup toolchain install nightly"; exit 1; }
	@$(CARGO) fuzz --version >/dev/null 2>&1 || { echo "installing cargo-fuzz"; $(CARGO) install --locked cargo-fuzz; }

fuzz: fuzz-tools
	$(CARGO) $(NIGHTLY) fuzz build
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/target/corpus/$$t; \
	  echo "fuzzing $$t for $(FUZZ_SECONDS) s"; \
	  $(CARGO) $(NIGHTLY) fuzz run $$t fuzz/target/corpus/$$t fuzz/corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 || exit 1; \
	done

# The short run `make test` does: each target for FUZZ_SMOKE_SECONDS, or a clear line saying why not.
fuzz-smoke:
	@if $(CARGO) $(NIGHTLY) --version >/dev/null 2>&1; then \
	  $(MAKE) fuzz FUZZ_SECONDS=$(FUZZ_SMOKE_SECONDS); \
	else \
	  echo "SKIPPED: fuzzing (no nightly toolchain here: rustup toolchain install nightly)"; \
	fi

# The Rust test suite under AddressSanitizer (nightly). --target keeps the sanitizer off build
# scripts and proc-macros; the standard library is not rebuilt (that needs rust-src), so ASan
# sees our code and the crates', not std's. WSCLIENT_ASAN=1 skips the tests that only drive
# other programs (the C examples under valgrind, wsjs), which do not run the ASan build.
ASAN_TARGET ?= x86_64-unknown-linux-gnu
asan: deps all peers
	RUSTFLAGS="-Zsanitizer=address" RUSTDOCFLAGS="-Zsanitizer=address" WSCLIENT_ASAN=1 \
	  ASAN_OPTIONS="detect_leaks=1:detect_stack_use_after_return=1" \
	  $(CARGO) $(NIGHTLY) test --no-fail-fast --target $(ASAN_TARGET) --target-dir target/asan -- --test-threads=2

# The gates every change passes: formatting and clippy with warnings as errors.
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets --features pipe-wake -- -D warnings

# Runs the C echo example over wss against the bundled local server, with a throwaway CA.
demo: deps all
	examples-c/demo.sh

# Runs the shared benchmark harness with our client (examples-c/bench.c) added beside the
# others, prints the tables and keeps them in BENCHMARKS.md. RUNS=.. ONLY=W1,W2 pass through.
bench: all
	examples-c/bench.sh $(SHARED)/bench $(abspath $(BUILD)/bench)

# permessage-deflate's memory benchmark: peak RSS of 2000 connections with one message echoed
# on each, compression on and off, side by side (COUNT=.., BYTES="256 1024 4096" pass through).
bench-memory: all peers
	examples-c/bench-memory.sh $(abspath $(BUILD)/many)

# Rewrites include/wsclient.h from the sources (the header test fails while it is stale).
header:
	WSCLIENT_UPDATE_HEADER=1 $(CARGO) test --test header

clean:
	rm -rf $(BUILD) fuzz/target fuzz/artifacts
	$(CARGO) clean
