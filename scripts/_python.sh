# Sourced by scripts/setup.sh, scripts/test and scripts/demo: which Python the project runs under.
#   $PYTHON if set; else the project's virtualenv (.venv) once setup.sh made one; else python3.
# setup.sh makes .venv when python3 cannot take a pip install: Debian's and Ubuntu's own
# python3 is "externally managed" (PEP 668) and comes without pip.
project_python() {
    if [ -n "${PYTHON:-}" ]; then
        echo "$PYTHON"
    elif [ -x .venv/bin/python ]; then
        echo "$PWD/.venv/bin/python"
    else
        echo python3
    fi
}

# True when "$1" can pip-install the project: it has pip, and it is a virtualenv or not
# externally managed.
pip_installable() {
    "$1" - <<'PY' 2>/dev/null
import importlib.util, os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
in_venv = sys.prefix != sys.base_prefix
sys.exit(0 if importlib.util.find_spec("pip") and (in_venv or not managed) else 1)
PY
}
