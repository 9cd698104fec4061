#!/usr/bin/env bash
# The whole of VANS trained from nothing on the Shapes world, on a CPU (or a GPU when there is one),
# and the table of docs/shapes.md, one seed at a time:
#
#   bash run_shapes.sh                        # seed 0 into out/shapes
#   SEED=1 bash run_shapes.sh out/shapes-1    # another seed (the data, the CLIP and the VAE stay the same)
#   SEED=1 VDM=weights/shapes-sft bash run_shapes.sh out/shapes-1
#                                             # another seed on seed 0's SFT VDM and CLIP (shipped): its DiT's
#                                             # 8,000 steps are 1.8 h of a seed's 5 h on 2 cores
#
# data -> a CLIP and a VAE for this world -> SFT of the VLM and of the DiT, then the rows, each
# evaluated on the test split once its models exist:
#   sft            1. the SFT VLM and VDM
#   sft_more       2. the SFT VLM trained on for as long as stage 1 took (the fair control)
#   stage1_text    3. stage 1 with r_f + r_t1 only
#   stage1         4. stage 1 with r_f + r_t1 + r_v1
#   joint_grpo     5. row 4 + stage 2 (r_v2 + r_c2): Joint-GRPO
#   stage2_no_ct   6. row 4 + stage 2 without r_c2 (the paper's ablation)
#   stage2_random     row 4 + stage 2 on a random reward, the same steps (stage 2's control)
# and OUT/shapes-sft, OUT/shapes: the SFT and Joint-GRPO pairs packed as weights/ ships them.
# Every stage's settings are in config/shapes.py; each prints its time and appends it to
# OUT/times.txt, the record of finished stages: a rerun skips those and resumes an
# interrupted training stage from its last checkpoint (--resume).
set -euo pipefail
cd "$(dirname "$0")"
export HF_HUB_OFFLINE=1
OUT=${1:-out/shapes}
SEED=${SEED:-0}
VDM=${VDM:-}  # a packed SFT VDM to share (its clip/ becomes the world's CLIP); empty: train this seed's
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
evaluate() {  # evaluate ROW --model ... : eval.py on the test split into OUT/eval/ROW
    local row=$1
    shift
    stage "eval $row" python eval.py --manifest $DATA/test.jsonl --clip $DATA/clip --gt-cache $DATA/gt_i3d --metrics shapes:metrics \
        --seed $SEED --out $OUT/eval/$row "$@"
}

# the world's data, its CLIP and its VAE are made once (seed 0) and shared by every seed, as the
# paper's rewards and metrics all use OpenAI's CLIP; test.jsonl is written last
W=$DATA/times
mkdir -p $W
if [ ! -e $DATA/test.jsonl ]; then
    OUT=$W stage data python shapes.py data --out $DATA --n-train 4000 --n-val 100 --n-test 200 --height 64 --width 112
fi
python -c "import json, sys; e = json.loads(open('$DATA/test.jsonl').readline())['event']
sys.exit(0 if 'others' in e else 'error: $DATA holds the classic world; move it away (the question world is written there)')"
if [ -n "$VDM" ]; then
    [ -e $DATA/clip ] || cp -r "$VDM/clip" $DATA/clip
else
    OUT=$W stage clip python shapes.py train-clip --train $DATA/train.jsonl --out $DATA/clip --seed 0
    OUT=$W stage vae python shapes.py train-vae --train $DATA/train.jsonl --val $DATA/val.jsonl --out $DATA/vae --seed 0 --resume
fi

stage sft_vlm python sft_vlm.py --config $C --out $OUT/sft_vlm --seed $SEED --resume
if [ -z "$VDM" ]; then
    stage sft_vdm python sft_vdm.py --config $C --model $DATA/vae/last --out $OUT/sft_vdm --seed $SEED --resume
    VDM=$OUT/sft_vdm/last
fi
evaluate sft --model $OUT/sft_vlm/last --vdm $VDM

stage grpo_stage1 python grpo_stage1.py --config $C --init $OUT/sft_vlm/last --vdm $VDM \
    --out $OUT/grpo_stage1 --seed $SEED --resume
evaluate stage1 --model $OUT/grpo_stage1/last
stage grpo_stage1_text python grpo_stage1.py --config $C --init $OUT/sft_vlm/last --vdm $VDM \
    --rewards format=1,rouge_l=1 --out $OUT/grpo_stage1_text --seed $SEED --resume
evaluate stage1_text --model $OUT/grpo_stage1_text/last

# row 2: SFT goes on for as long as stage 1 took (its time per step x its steps, from the logs), at a
# rate of 2e-4 (0.4 of SFT's peak; its schedule had decayed to 0), in another data order
steps=$(python -c "
import json
per_step = lambda run: [r['sec_per_step'] for r in map(json.loads, open(run + '/log.jsonl')) if 'sec_per_step' in r][-1]
t = per_step('$OUT/grpo_stage1') * json.load(open('$OUT/grpo_stage1/last/meta.json'))['step']
print(max(1, round(t / per_step('$OUT/sft_vlm'))))")
stage sft_more python sft_vlm.py --config $C --model $OUT/sft_vlm/last --steps "$steps" --lr 2e-4 --warmup 0 \
    --out $OUT/sft_more --seed $((SEED + 100)) --resume
evaluate sft_more --model $OUT/sft_more/last --vdm $VDM

stage grpo_stage2 python grpo_stage2.py --config $C --vlm $OUT/grpo_stage1/last --vdm $VDM \
    --out $OUT/grpo_stage2 --seed $SEED --resume
evaluate joint_grpo --model $OUT/grpo_stage2/last
# the ablation and the control differ in their reward only: they start from stage 2's anchor captions
for run in grpo_stage2_no_ct grpo_stage2_random; do
    mkdir -p $OUT/$run
    cp -n $OUT/grpo_stage2/anchors.* $OUT/$run/
done
stage grpo_stage2_no_ct python grpo_stage2.py --config $C --vlm $OUT/grpo_stage1/last --vdm $VDM \
    --rewards clip_v=1 --out $OUT/grpo_stage2_no_ct --seed $SEED --resume
evaluate stage2_no_ct --model $OUT/grpo_stage2_no_ct/last
stage grpo_stage2_random python grpo_stage2.py --config $C --vlm $OUT/grpo_stage1/last --vdm $VDM \
    --rewards shapes:random_reward=1 --out $OUT/grpo_stage2_random --seed $SEED --resume
evaluate stage2_random --model $OUT/grpo_stage2_random/last

# the pairs to ship (weights/shapes-sft and weights/shapes are seed 0's): SFT's, and Joint-GRPO's as its
# stage-1 LoRA and stage-2 DiT over SFT's
stage ship_sft python checkpoint.py --vlm $OUT/sft_vlm/last --vdm $VDM --clip $DATA/clip --out $OUT/shapes-sft
stage ship python checkpoint.py --vlm $OUT/grpo_stage2/last --vdm $OUT/grpo_stage2/last --on $OUT/shapes-sft \
    --clip $DATA/clip --out $OUT/shapes
python plot_curves.py $OUT/grpo_stage1 $OUT/grpo_stage2 --out $OUT/curves.png
python eval.py --table $OUT/eval/{sft,sft_more,stage1_text,stage1,joint_grpo,stage2_no_ct,stage2_random}/results.json
