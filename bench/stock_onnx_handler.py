"""The smallest handler stock TorchServe 0.12 needs to serve an ONNX graph (the stock baseline of bench_serve).

TorchServe's own `base_handler` loads a `.onnx` serialized file into an onnxruntime InferenceSession
(`setup_ort_session`: CPU provider, intra_op_num_threads = the machine's logical CPU count), but its
`inference` then calls `self.model(tensor)`, and an InferenceSession is not callable: archived with
`--handler base_handler`, every request fails with `TypeError: 'InferenceSession' object is not callable`
(checked on TorchServe 0.12.0; no other built-in handler fits a tensor model: image_classifier & co. feed
224 x 224 ImageNet crops). TorchServe's own ONNX test does what this file does: keep everything of
BaseHandler and only run the session. So the baseline is stock TorchServe plus these lines:

    initialize    BaseHandler's (onnxruntime session on the archive's serialized file)
    preprocess    BaseHandler's: torch.as_tensor(batch) of the rows the JSON envelope (service_envelope=json,
                  TensorFlow-Serving style `{"instances": [C x H x W nested list]}`) joined across requests
    inference     here: session.run on the tensor as float32 numpy
    postprocess   BaseHandler's: logits.tolist(); the envelope answers `{"predictions": [[logit, ...]]}`
"""
from ts.torch_handler.base_handler import BaseHandler


class StockOnnxHandler(BaseHandler):
    def inference(self, data, *args, **kwargs):
        session = self.model
        return session.run(None, {session.get_inputs()[0].name: data.numpy()})[0]
