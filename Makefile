# hypersdk — set-up, tests and the demo on a fresh Debian machine (as root).
# Debian's Python: a venv built on it is usable by every user on the machine, so tests
# can run the bridge and hyperctl as unprivileged users (a pyenv under /root is not).
PYTHON ?= /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
PREFIX ?= /usr
SYSCONFDIR ?= /etc
DESTDIR ?=

.PHONY: venv test test-fast demo install clean

# Where Debian expects each file; override PREFIX for /usr/local.
UNITDIR ?= $(PREFIX)/lib/systemd/system
DBUSDIR ?= $(PREFIX)/share/dbus-1
POLKITDIR ?= $(PREFIX)/share/polkit-1
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
# Debian's pip installs locally built packages under /usr/local (scheme posix_local)
BINDIR ?= /usr/local/bin

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install-system-deps.sh
	bash scripts/install-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[all,test]'
	touch $@

test: venv
	$(PY) -m pytest -q -ra

demo: venv
	$(PY) scripts/demo.py

test-fast: venv
	$(PY) -m pytest -q -ra -m "not slow"

install:
	$(PYTHON) -m pip install -q --no-deps --ignore-installed --no-warn-script-location \
		--break-system-packages --root="$(DESTDIR)/" .
	install -D -m 0644 data/dbus-1/system.d/org.hypersdk.HyperSDK1.conf \
		"$(DESTDIR)$(DBUSDIR)/system.d/org.hypersdk.HyperSDK1.conf"
	sed 's|/usr/bin/|$(BINDIR)/|g' data/dbus-1/system-services/org.hypersdk.HyperSDK1.service \
		| install -D -m 0644 /dev/stdin "$(DESTDIR)$(DBUSDIR)/system-services/org.hypersdk.HyperSDK1.service"
	for xml in service/dbus/org.hypersdk.HyperSDK1.*.xml; do \
		install -D -m 0644 "$$xml" "$(DESTDIR)$(DBUSDIR)/interfaces/$$(basename $$xml)"; done
	for unit in data/systemd/*.service; do \
		sed 's|/usr/bin/|$(BINDIR)/|g' "$$unit" \
		| install -D -m 0644 /dev/stdin "$(DESTDIR)$(UNITDIR)/$$(basename $$unit)"; done
	install -D -m 0644 polkit/org.hypersdk.HyperSDK1.policy \
		"$(DESTDIR)$(POLKITDIR)/actions/org.hypersdk.HyperSDK1.policy"
	install -D -m 0644 polkit/50-hypersdk.rules "$(DESTDIR)$(POLKITDIR)/rules.d/50-hypersdk.rules"
	install -D -m 0644 data/sysusers.d/hypersdk.conf "$(DESTDIR)$(SYSUSERSDIR)/hypersdk.conf"
	install -d -m 0755 "$(DESTDIR)$(SYSCONFDIR)/hypersdk"
	test -e "$(DESTDIR)$(SYSCONFDIR)/hypersdk/config.yaml" || \
		install -m 0640 data/config.example.yaml "$(DESTDIR)$(SYSCONFDIR)/hypersdk/config.yaml"
	@if [ -z "$(DESTDIR)" ]; then \
		getent group hypersdk >/dev/null || groupadd --system hypersdk; \
		getent passwd hypersdk >/dev/null || useradd --system -g hypersdk \
			-d /var/lib/hypersdk -s /usr/sbin/nologin hypersdk; \
		$(BINDIR)/hypersdk-bridge --init-tokens --config $(SYSCONFDIR)/hypersdk/config.yaml; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info
