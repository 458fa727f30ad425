# Source me: puts the project venv's NVRTC on the library path (scripts/setup.sh installs it).
_kvs_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for _d in "$_kvs_root"/.venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib; do
  [ -d "$_d" ] && export LD_LIBRARY_PATH="$_d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
unset _d _kvs_root
