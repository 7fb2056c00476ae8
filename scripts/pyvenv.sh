#!/usr/bin/env bash
# The venv of the Python client's tests, lint tools and benchmark: target/pyvenv, from
# clients/python/requirements-dev.txt (PyPI), set up again whenever that file changes. Source it from the
# repository root after scripts/services.sh (which defines install_packages), then run `ensure_pyvenv NAME`
# (NAME starts its messages); "$python_venv/bin/python" is then ready.

python_venv=target/pyvenv

ensure_pyvenv() {
    local name=$1
    command -v python3 >/dev/null 2>&1 && python3 -c 'import venv, ensurepip' 2>/dev/null \
        || install_packages python3 python3-venv
    if [ ! -x "$python_venv/bin/pytest" ] || ! cmp -s clients/python/requirements-dev.txt "$python_venv/requirements-dev.txt"; then
        echo "$name: setting up $python_venv" >&2
        python3 -m venv --clear "$python_venv"
        "$python_venv/bin/pip" install --quiet --disable-pip-version-check -r clients/python/requirements-dev.txt
        cp clients/python/requirements-dev.txt "$python_venv/requirements-dev.txt"
    fi
}
