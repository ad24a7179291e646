"""echo_export: checkpoint -> verified engine folder (`echo-export build` / `inspect`).

graphs.py          nn.Module wrappers with the IO of runtime/graph_io.py, dynamo export
decode_loop.py     a minimal decode loop over that contract (onnxruntime or PyTorch runners)
precision.py       fp16 conversion (IO fp32) and int8 QDQ quantisation
tensorrt_build.py  strongly typed TensorRT plans + Polygraphy comparison (the [trt] extra)
verify.py          token agreement / finding F1 of every variant against the PyTorch reference
build.py           the build: checks, phases, temp folder, manifest written last
inspect_engine.py  what an engine folder holds
cli.py             the click group `main`
"""
