# trionode: `make start` runs a node, `make test` runs every check. Both set themselves up.
PYTHON ?= python3.11
SHELL  := /bin/bash
VENV   := .venv
BIN    := $(VENV)/bin
HOME_DIR ?= .trionode
STAMP  := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-runtime
BULK_SRC := trionode/store/_lmdb_bulk.c
BULK_STAMP := $(VENV)/.built-bulk
DIGESTS_SRC := trionode/crdt/_digests.c
DIGESTS_STAMP := $(VENV)/.built-digests

.PHONY: start test lint typecheck unit netns-tools test-slow bench bench-smoke clean browser screenshots

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or PYTHON=python3)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall whenever pyproject.toml or the install lines here change.
# py-libp2p (an interop test dependency) pulls in trio-typing, whose outdated trio/outcome
# stubs would shadow the inline types of trio 0.35 for mypy; nothing imports them at run time.
# The checkout is installed as a plain path (`compat`, a .pth line): setuptools' default
# editable install loads an import hook at every interpreter start, and with it pathlib, re
# and urllib.parse (~13 ms of a CLI command's ~30 ms start; `python -X importtime -c pass`).
# (setuptools calls `compat` transitional: if it goes, drop the setting, nothing else.)
EDITABLE := --config-settings editable_mode=compat
$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install -q $(EDITABLE) -e '.[test]'
	rm -rf $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/{trio,outcome,async_generator}-stubs
	@touch $(STAMP)

# `make start` needs only the runtime dependencies; the test extras (ruff, mypy, libp2p,
# grpcio, ...) are installed by the first target that needs them.
$(RUN_STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install -q $(EDITABLE) -e .
	@touch $(RUN_STAMP)

# The store's bulk puts with the GIL released (trionode/store/_lmdb_bulk.c, issue #17),
# built beside its source for the venv's Python. Without a C compiler and Python's headers
# it is not built (said so, and tried again next time): the store then puts those rows
# through py-lmdb alone (the same rows; a join's writer waits longer for the GIL).
$(BULK_STAMP): $(BULK_SRC) | $(BIN)/python
	@out=trionode/store/_lmdb_bulk$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))'); \
	inc=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	if $${CC:-cc} -O2 -Wall -Wextra -Wno-unused-parameter -shared -fPIC -I"$$inc" $(BULK_SRC) -o "$$out" -ldl; then \
		touch $@; \
	else \
		rm -f "$$out"; \
		echo "note: $(BULK_SRC) is not built (needs a C compiler and Python's headers): the store puts bulk rows through py-lmdb alone"; \
	fi

# A snapshot's record digests in one call per page (trionode/crdt/_digests.c, issue #17),
# likewise: without it they are hashed through hashlib (the same digests, more CPU).
$(DIGESTS_STAMP): $(DIGESTS_SRC) | $(BIN)/python
	@out=trionode/crdt/_digests$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))'); \
	inc=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	if $${CC:-cc} -O2 -Wall -Wextra -Wno-unused-parameter -shared -fPIC -I"$$inc" $(DIGESTS_SRC) -o "$$out" -ldl; then \
		touch $@; \
	else \
		rm -f "$$out"; \
		echo "note: $(DIGESTS_SRC) is not built (needs a C compiler and Python's headers): record digests go through hashlib"; \
	fi

start: $(RUN_STAMP) $(BULK_STAMP) $(DIGESTS_STAMP)
	@test -f $(HOME_DIR)/config.toml || $(BIN)/trionode init --home $(HOME_DIR)
	exec $(BIN)/trionode start --home $(HOME_DIR)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The page's tests drive Debian's Chromium (Playwright's own browser download is not used).
# As root (CI, fresh machines) install it when it is missing; otherwise say so (they skip).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: the browser tests will skip (apt-get install chromium)"; fi; }


# The network-namespace tests (tests/net/test_netns_relay.py) need nftables; as root on a
# Debian-like machine it is installed here, elsewhere those tests skip and say why.
netns-tools:
	@if [ "$$(id -u)" = 0 ] && ! command -v nft >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		echo "installing nftables for the network-namespace tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iproute2 >/dev/null; \
	fi

unit: $(STAMP) $(BULK_STAMP) $(DIGESTS_STAMP) browser netns-tools
	$(BIN)/pytest -q -m "not slow"

test: lint typecheck unit

test-slow: $(STAMP) $(BULK_STAMP) $(DIGESTS_STAMP)
	$(BIN)/pytest -q -m slow

bench: $(STAMP) $(BULK_STAMP) $(DIGESTS_STAMP)
	$(BIN)/python -m benchmarks

bench-smoke: $(STAMP) $(BULK_STAMP) $(DIGESTS_STAMP)
	$(BIN)/python -m benchmarks --quick

# Refresh the page's screenshots in docs/ (from the browser tests' happy paths).
screenshots: $(STAMP) browser
	TRIONODE_SCREENSHOTS=docs $(BIN)/pytest -q tests/browser -k "sign_in or live or fits or sync or blob"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
	rm -f trionode/store/_lmdb_bulk*.so trionode/crdt/_digests*.so
