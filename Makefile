# wsclient: build, test and demo. `make demo` and `make test` do all the set-up they need.
CARGO ?= cargo
CC ?= cc
CXX ?= c++
CFLAGS ?= -O2 -g
WARN := -std=c11 -Wall -Wextra -Wpedantic -Werror
LIBDIR := target/release
BUILD := examples-c/build
EXAMPLES := $(BUILD)/echo $(BUILD)/flow $(BUILD)/wsjs
# Debian packages the tests and examples need (installed by `make deps` when root).
DEB_PACKAGES := valgrind pkg-config duktape-dev

.PHONY: all lib examples deps test demo header clean

all: deps lib examples

# The library (libwsclient.so with soname libwsclient.so.0, libwsclient.a) and the bundled test server.
lib:
	$(CARGO) build --release --lib --example testserver
	ln -sf libwsclient.so $(LIBDIR)/libwsclient.so.0

examples: $(EXAMPLES)

$(BUILD):
	mkdir -p $@

# wsjs embeds Duktape (Debian's duktape-dev, found with pkg-config).
$(BUILD)/wsjs: examples-c/wsjs.c include/wsclient.h lib | $(BUILD)
	$(CC) $(WARN) $(CFLAGS) -Iinclude $$(pkg-config --cflags duktape) $< -o $@ \
	  -L$(LIBDIR) -lwsclient -Wl,-rpath,$(abspath $(LIBDIR)) $$(pkg-config --libs duktape) -lm

$(BUILD)/%: examples-c/%.c include/wsclient.h lib | $(BUILD)
	$(CC) $(WARN) $(CFLAGS) -Iinclude $< -o $@ -L$(LIBDIR) -lwsclient -Wl,-rpath,$(abspath $(LIBDIR))

deps:
	@missing=""; \
	for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing"; echo "install them with: sudo apt-get install$$missing"; exit 1; \
	  fi; \
	fi

# Every test: Rust unit and integration tests (the C functions against local servers, ws and
# wss), the header check, and the C examples under valgrind (run by tests/c_examples.rs).
test: deps all
	$(CARGO) test -- --test-threads=4

# Runs the C echo example over wss against the bundled local server, with a throwaway CA.
demo: deps all
	examples-c/demo.sh

# Rewrites include/wsclient.h from the sources (the header test fails while it is stale).
header:
	WSCLIENT_UPDATE_HEADER=1 $(CARGO) test --test header

clean:
	rm -rf $(BUILD)
	$(CARGO) clean
