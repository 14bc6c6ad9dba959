"""The stock baseline with onnxruntime's thread-pool spinning turned off: an explanation, not a baseline.

bench/stock_onnx_handler.py keeps BaseHandler's session (intra_op_num_threads = the logical CPU count, and
onnxruntime's default `session.intra_op.allow_spinning=1`): between requests its pool threads busy-wait for
work, so at concurrency 1 the stock worker burns CPU while it waits out maxBatchDelay. This handler
is the same one with the session reopened with spinning off (`make bench-serve` with `--stock-no-spin`), to
measure what that busy-waiting buys the stock server's latency.
"""
import onnxruntime as ort
import psutil
from ts.torch_handler.base_handler import BaseHandler


class StockOnnxNoSpinHandler(BaseHandler):
    def initialize(self, context):
        super().initialize(context)
        options = ort.SessionOptions()
        options.intra_op_num_threads = psutil.cpu_count(logical=True)  # as BaseHandler's setup_ort_session
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.model = ort.InferenceSession(self.model_pt_path, sess_options=options, providers=["CPUExecutionProvider"])

    def inference(self, data, *args, **kwargs):
        session = self.model
        return session.run(None, {session.get_inputs()[0].name: data.numpy()})[0]
