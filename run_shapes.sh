#!/usr/bin/env bash
# The whole of VANS trained from nothing on the Shapes world, on a CPU (or a GPU when there is one):
#
#   bash run_shapes.sh                        # seed 0 into out/shapes
#   SEED=1 bash run_shapes.sh out/shapes-1    # another seed (the data and the CLIP stay the same)
#
# data -> a CLIP for this world -> VLM -> VAE -> DiT + text encoder -> Joint-GRPO stage 1 -> stage 2
# (and stage 2 without r_c2), each row of the table evaluated on the test split once its models
# exist -> curves.
# Every stage's settings are in config/shapes.py; each prints its time and appends it to
# OUT/times.txt, the record of finished stages: a rerun skips those and resumes an
# interrupted training stage from its last checkpoint (--resume).
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1
OUT=${1:-out/shapes}
SEED=${SEED:-0}
DATA=data/shapes
C=config/shapes.py
mkdir -p "$OUT"

stage() {  # stage NAME COMMAND...: run COMMAND unless OUT/times.txt records NAME as finished, and time it
    local name=$1 t0=$SECONDS
    shift
    if grep -qs "^$name [0-9]* s$" "$OUT/times.txt"; then echo "== $name: done already"; return; fi
    echo "== $name"
    "$@"
    echo "$name $((SECONDS - t0)) s" | tee -a "$OUT/times.txt"
}

# the data are the same for every seed; test.jsonl is written last
if [ ! -e $DATA/test.jsonl ]; then
    stage data python shapes.py data --out $DATA --n-train 4000 --n-val 100 --n-test 200 --height 64 --width 112
fi
# so is the CLIP of this world, trained once (seed 0): the rewards and the metrics of every seed
# use the same one, as the paper's use OpenAI's CLIP
if [ ! -e $DATA/clip/clip.safetensors ]; then
    stage clip python shapes.py train-clip --train $DATA/train.jsonl --out $DATA/clip --seed 0
fi
# each row of the table (untrained, SFT, + stage 1, + stage 2 = Joint-GRPO, stage 2 without r_c2)
# is evaluated on the test split as soon as its models exist
evaluate() {  # evaluate ROW --model ... : eval.py on the test split into OUT/eval/ROW
    local row=$1
    shift
    stage "eval $row" python eval.py --manifest $DATA/test.jsonl --clip $DATA/clip --gt-cache $DATA/gt_i3d \
        --seed $SEED --out $OUT/eval/$row "$@"
}
stage sft_vlm python sft_vlm.py --config $C --out $OUT/sft_vlm --seed $SEED --resume
stage vae python sft_vdm.py --config $C:sft_vae --out $OUT/vae --seed $SEED --resume
stage sft_vdm python sft_vdm.py --config $C --model $OUT/vae/last --out $OUT/sft_vdm --seed $SEED --resume
stage grpo_stage1 python grpo_stage1.py --config $C --init $OUT/sft_vlm/last \
    --vdm $OUT/sft_vdm/last --clip $DATA/clip --out $OUT/grpo_stage1 --seed $SEED --resume
evaluate sft --model $OUT/sft_vlm/last --vdm $OUT/sft_vdm/last
evaluate stage1 --model $OUT/grpo_stage1/last
stage grpo_stage2 python grpo_stage2.py --config $C --vlm $OUT/grpo_stage1/last \
    --vdm $OUT/sft_vdm/last --clip $DATA/clip --out $OUT/grpo_stage2 --seed $SEED --resume
evaluate joint_grpo --model $OUT/grpo_stage2/last
# the ablation differs in its reward only: it starts from stage 2's anchor captions (same VLM, same seed)
mkdir -p $OUT/grpo_stage2_no_ct
cp -n $OUT/grpo_stage2/anchors.* $OUT/grpo_stage2_no_ct/
stage grpo_stage2_no_ct python grpo_stage2.py --config $C --vlm $OUT/grpo_stage1/last \
    --vdm $OUT/sft_vdm/last --clip $DATA/clip --rewards clip_v=1 --out $OUT/grpo_stage2_no_ct --seed $SEED --resume
evaluate stage2_no_ct --model $OUT/grpo_stage2_no_ct/last
evaluate untrained --model random:shapes

python plot_curves.py $OUT/grpo_stage1 $OUT/grpo_stage2 --out $OUT/curves.png
python eval.py --table $OUT/eval/{untrained,sft,stage1,joint_grpo,stage2_no_ct}/results.json
