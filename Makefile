# Two commands a newcomer needs: `make demo` and `make test`. Both bootstrap through `make setup`,
# which is idempotent: it installs only what is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := libsystemd-dev pkg-config ffmpeg
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup demo test test-slow test-all bench experiment clean install-units
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "setup: installing Debian packages: $$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@[ -x $(PY) ] || { python=$$(scripts/find-python) && echo "setup: creating $(VENV) with $$python" && "$$python" -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	@touch $@

# `make demo`: 3 simulated hosts record, federate, validate and roll out (~10 min on 2 cores); results in outputs/demo.
# More: make demo DEMO_ARGS="--full" (the full-size path), DEMO_ARGS="--arm" (one tele-operated arm, a PNG).
DEMO_ARGS ?=
demo: setup
	$(VENV)/bin/zk0 demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -m "not slow" -q

test-slow: setup
	$(PY) -m pytest -m slow -q

test-all: setup
	$(PY) -m pytest -q

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b; done

experiment: setup   # issue #13's benchmark (<= 90 min on 2 cores): results in outputs/fl-vs-central/results.md
	OMP_NUM_THREADS=1 $(VENV)/bin/zk0 experiment fl-vs-central --out outputs/fl-vs-central

clean:
	rm -rf outputs .pytest_cache

# Units, the zk0 user and group, and the commands the units start (links into BINDIR to this checkout's venv).
# Run as root; DESTDIR stages everything under another root (sysusers then edits DESTDIR/etc/passwd).
UNITDIR ?= /etc/systemd/system
SYSUSERSDIR ?= /etc/sysusers.d
BINDIR ?= /usr/local/bin
install-units:
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(BINDIR) $(DESTDIR)/etc/zk0
	install -m 0644 systemd/zk0-agent.service systemd/zk0-server.service $(DESTDIR)$(UNITDIR)/
	install -m 0644 systemd/zk0.sysusers.conf $(DESTDIR)$(SYSUSERSDIR)/zk0.conf
	systemd-sysusers $(if $(DESTDIR),--root=$(DESTDIR)) zk0.conf
	@venv=$(abspath $(VENV)); for cmd in zk0 zk0-agent zk0ctl; do \
		if [ -x $$venv/bin/$$cmd ]; then ln -sfn $$venv/bin/$$cmd $(DESTDIR)$(BINDIR)/$$cmd; \
		else echo "install-units: $$venv/bin/$$cmd missing: $(BINDIR)/$$cmd not linked"; fi; \
	done
	@for path in $(abspath $(VENV)) $$(readlink -f $(VENV)/bin/python); do case "$$path/" in /home/*|/root/*|/run/user/*) \
		echo "install-units: WARNING: $$path is under a home directory, which the units hide (ProtectHome=yes)" \
		"and user zk0 may not read: install zk0 and its Python elsewhere, e.g. /opt/zk0";; esac; done
	@if [ -n "$(DESTDIR)" ]; then :; elif [ -d /run/systemd/system ]; then systemctl daemon-reload; \
	else echo "install-units: systemd is not running here: no daemon-reload"; fi
	@echo "install-units: next: put agent.yaml (or server.yaml) in /etc/zk0, then systemctl enable --now zk0-agent"
