#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` once, from the llama.cpp sources vendored in the sdist of the installed
# llama-cpp-python (so it is the same llama.cpp the GGUF export is proven against), into a cache directory that a
# second run reuses: prints the binary's path on stdout, the build's progress on stderr.
#   bash scripts/build_llama_server.sh            # uses $PYTHON (default .venv/bin/python, else python3)
#   LORAKIT_LLAMA_SERVER_CACHE=/some/dir ...       # cache root (default ~/.cache/lorakit/llama-server)
# Only the llama-server target is built (Release, CPU, no curl, no tests/examples), static, -j"${JOBS:-2}":
# ~8+ minutes on 2 cores the first time. It is built for THIS machine's CPU (GGML_NATIVE=ON, as a user running
# llama.cpp locally would), so the cache key includes a hash of the CPU's flags: a cache shared with another
# kind of CPU builds its own copy rather than dying with SIGILL.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
version="$("$py" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')"
cpu="$(grep -m1 '^flags' /proc/cpuinfo | sha256sum | cut -c1-12)"
root="${LORAKIT_LLAMA_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lorakit/llama-server}"
dest="$root/$version/$cpu"
if [ -x "$dest/llama-server" ]; then
  echo "$dest/llama-server"
  exit 0
fi
# The sources and objects stay in $work until the binary is in place: an interrupted build (Ctrl-C, a timeout)
# resumes where it stopped on the next run; a finished one removes them. LORAKIT_LLAMA_SERVER_WORK names another
# work dir (one holding llama_cpp_python-<version>/ and build/ from an earlier, interrupted run).
work="${LORAKIT_LLAMA_SERVER_WORK:-$dest.build}"
mkdir -p "$work"
echo "build_llama_server: llama-cpp-python $version sdist -> $dest (~8+ minutes on 2 cores)" >&2
if [ ! -d "$work/llama_cpp_python-$version" ]; then
  # --no-binary for llama-cpp-python only: pip prepares the sdist's metadata, its build tools come as wheels
  "$py" -m pip download -q --disable-pip-version-check --no-binary llama-cpp-python --no-deps -d "$work" \
    "llama-cpp-python==$version" >&2
  tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
fi
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
start=$(date +%s)
generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi
cmake -S "$src" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$work/build" --target llama-server -j"${JOBS:-2}" >&2
mkdir -p "$dest"
cp "$work/build/bin/llama-server" "$dest/llama-server.tmp"
mv "$dest/llama-server.tmp" "$dest/llama-server"
rm -rf "$work"
echo "build_llama_server: built in $(($(date +%s) - start)) s (a resumed build: its resumed part)" >&2
echo "$dest/llama-server"
