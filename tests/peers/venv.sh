#!/usr/bin/env bash
# venv.sh DIR: makes DIR a Python virtualenv with tests/peers/requirements.txt installed, once
# (again only when requirements.txt changes), and prints DIR's python. Safe to run from several
# processes at once: they take turns on DIR.lock. Progress goes to stderr.
set -euo pipefail
dir=${1:?usage: venv.sh DIR}
here=$(cd "$(dirname "$0")" && pwd)
req="$here/requirements.txt"
mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9
want=$(sha256sum "$req" | cut -d' ' -f1)
stamp="$dir/.requirements.sha256"
if [ ! -x "$dir/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "venv.sh: creating $dir" >&2
  rm -rf "$dir"
  python3 -m venv "$dir" >&2
  "$dir/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$req" >&2
  echo "$want" >"$stamp"
fi
echo "$dir/bin/python"
