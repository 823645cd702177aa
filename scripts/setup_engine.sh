#!/usr/bin/env bash
# llama.cpp for `lora-compile export-gguf-lora` and the engine tests (pytest -m engine).
#
# 1. llama-cpp-python, pinned, built once from the registry's source package (hash-checked) into a
#    wheel kept in the cache, then installed from that wheel with its server extra. Building takes
#    ~6 minutes on 2 idle cores; a run with the wheel cached takes seconds.
# 2. llama.cpp's own LoRA converter (convert_lora_to_gguf.py with its conversion/ package and
#    gguf-py), which the wheel does not install, unpacked from the same source package into the
#    directory lora_compile.engine looks in (override with LORA_COMPILE_LLAMA_CPP).
#
# Cache: ${LORA_COMPILE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/lora-compile}. Keep it between CI runs.
set -euo pipefail

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CACHE="${LORA_COMPILE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-compile}"
SDIST_DIR="$CACHE/sdist"
WHEELS="$CACHE/wheels"
# lora_compile.engine.default_converter_dir() is ${XDG_CACHE_HOME:-~/.cache}/lora-compile/llama.cpp-VERSION.
CONVERTER_DIR="${LORA_COMPILE_LLAMA_CPP:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-compile/llama.cpp-$VERSION}"
SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
mkdir -p "$SDIST_DIR" "$WHEELS"
start=$SECONDS

if [ ! -f "$SDIST" ]; then
    pip download --no-binary :all: --no-deps --require-hashes -d "$SDIST_DIR" \
        -r <(echo "llama-cpp-python==$VERSION --hash=sha256:$SHA256")
fi
echo "$SHA256  $SDIST" | sha256sum -c --quiet

if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION (several minutes)"
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" pip wheel --no-deps -w "$WHEELS" "$SDIST"
fi
# Only the cached wheel: never a second build. The server extra's dependencies come from the registry.
pip install --find-links "$WHEELS" --only-binary llama-cpp-python "llama-cpp-python[server]==$VERSION"

if [ ! -f "$CONVERTER_DIR/convert_lora_to_gguf.py" ]; then
    tmp="$(mktemp -d "$(dirname "$CONVERTER_DIR")/.llama.cpp-XXXXXX")"
    root="llama_cpp_python-$VERSION/vendor/llama.cpp"
    tar -xzf "$SDIST" -C "$tmp" --strip-components=3 \
        "$root/convert_lora_to_gguf.py" "$root/convert_hf_to_gguf.py" "$root/conversion" "$root/gguf-py" "$root/LICENSE"
    mv "$tmp" "$CONVERTER_DIR"
fi
echo "llama.cpp ready in $((SECONDS - start)) s: llama-cpp-python $VERSION, converter in $CONVERTER_DIR"
