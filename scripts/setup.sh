#!/usr/bin/env bash
# Set up edgecc on a fresh Debian machine and (unless --no-demo) compile and run the bundled
# example for x86 and rpi4. Safe to rerun: every step skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

demo=1
[ "${1:-}" = "--no-demo" ] && demo=0

need_apt=()
command -v aarch64-linux-gnu-gcc >/dev/null || need_apt+=(gcc-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user)
# The host C compiler builds edgecc's qemu instruction-counting plugin (edgecc bench on rpi4).
command -v gcc >/dev/null || need_apt+=(gcc)
# Fashion-MNIST, for the accuracy measurements and tests (no downloads at run time).
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
# A headless browser for the test that loads the HTML report (edgecc report) and checks it.
command -v chromium >/dev/null || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need_apt[@]}"
fi

PY=${PYTHON:-python3}
echo "setup: installing Python packages (torch 2.13.0 CPU, TVM 0.27, ONNX tooling)"
# torch first with its exact pin: a looser requirement would pull a multi-GB CUDA build.
$PY -m pip install -q --disable-pip-version-check torch==2.13.0
$PY -m pip install -q --disable-pip-version-check -e ".[test]"
# The distill pass converts ONNX to torch with onnx2torch. --no-deps: it declares torchvision,
# which fails beside this torch; edgecc stubs torchvision while importing it (NMS/RoiAlign only).
$PY -m pip install -q --disable-pip-version-check --no-deps onnx2torch==1.5.15
echo "setup: building the qemu instruction-counting plugin (cached in ${EDGECC_CACHE:-$HOME/.cache/edgecc})"
$PY -c "from edgecc.runtime.emulation import insn_plugin; print(insn_plugin())"

if [ $demo = 1 ]; then
  echo "setup: preparing the aarch64 emulator (cached in ${EDGECC_CACHE:-$HOME/.cache/edgecc})"
  $PY -m edgecc.runtime.emulation
  for target in x86 rpi4; do
    echo
    echo "=== compile the example for $target ==="
    $PY -m edgecc compile examples/tinycnn/model.pt --target "$target" --input-shape x:1x3x32x32 \
        -o "build/tinycnn-$target" --dump-dir "build/tinycnn-$target-dumps"
    echo "=== run it ($target) ==="
    $PY -m edgecc run "build/tinycnn-$target" --check
  done
fi
