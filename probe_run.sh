# Next device call for issue 18 (after `git revert <the removal of this commit>`): the q/k/v kernel's
# GPU tests, then the step A/B on both models in alternating order, two pairs each (~7 minutes).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
L=$OUT/log.txt
timeout 150 python -m pytest tests/test_kernels.py -m gpu -q -p no:cacheprovider > $OUT/t.txt 2>&1
rc=$?; tail -2 $OUT/t.txt; cat $OUT/t.txt >> $L; rm $OUT/t.txt
[ $rc = 0 ] || { echo "kernel tests failed"; exit 1; }
for cfg in "vit_b16 20 off" "vit_b16 20 auto" "vit_h14 15 auto" "vit_h14 15 off" \
           "vit_b16 20 auto" "vit_b16 20 off" "vit_h14 15 off" "vit_h14 15 auto"; do set -- $cfg
  echo "== $1 fused_qkv=$3" | tee -a $L
  timeout 110 python -m jepa_jax.bench train --config $1 --impls cudnn --per-device-batch 128 --steps $2 \
    --config.model.fused_qkv=$3 > $OUT/t.txt 2>&1
  tail -1 $OUT/t.txt; cat $OUT/t.txt >> $L; rm $OUT/t.txt
done
