# Next device call for issue 18 (after `git revert <the removal of this commit>`): the kernel's GPU
# tests, the epilogue probe, the B/16 profile with the kernel off and on, then the step A/B.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
L=$OUT/log.txt
timeout 150 python -m pytest tests/test_kernels.py -m gpu -q -p no:cacheprovider -x > $OUT/t.txt 2>&1
rc=$?; tail -2 $OUT/t.txt; cat $OUT/t.txt >> $L; rm $OUT/t.txt
[ $rc = 0 ] || { echo "kernel tests failed"; exit 1; }
timeout 270 python -W ignore probe_pingpong.py > $OUT/p.txt 2>&1; tail -20 $OUT/p.txt; cat $OUT/p.txt >> $L; rm $OUT/p.txt
for fd in off auto; do
  timeout 120 python -m jepa_jax.bench profile --config vit_b16 --impls cudnn --steps 2 --top 25 \
    --config.model.fused_dense=$fd --out $OUT/profile_b16_$fd.json > $OUT/t.txt 2>&1
  echo "== profile vit_b16 $fd" >> $L; cat $OUT/t.txt >> $L; tail -30 $OUT/t.txt; rm $OUT/t.txt
done
for cfg in "vit_b16 20 off" "vit_b16 20 auto" "vit_h14 15 auto" "vit_h14 15 off"; do set -- $cfg
  echo "== $1 fused_dense=$3" | tee -a $L
  timeout 120 python -m jepa_jax.bench train --config $1 --impls cudnn --per-device-batch 128 --steps $2 \
    --config.model.fused_dense=$3 --out $OUT/train_$1_$3.json > $OUT/t.txt 2>&1
  tail -1 $OUT/t.txt; cat $OUT/t.txt >> $L; rm $OUT/t.txt
done
