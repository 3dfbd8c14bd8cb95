"""The pipeline class of the seed guide, usable from Python.

from config import Config
from main import KronosTrainingPipeline

pipe = KronosTrainingPipeline(Config.from_file("../examples/configs/demo.json"), fast_mode=True)
pipe.run_data_processing()      # step 1: load, clean, split, save the dataset
pipe.run_tokenizer_training()   # step 2: finetune (or train) the tokenizer
pipe.run_predictor_training()   # step 3: finetune (or train) the predictor
pipe.run_prediction()           # step 4: forecast the latest bars of every symbol
pipe.run_evaluation()           # metrics on the test split
pipe.run_backtest()             # top-k backtest of the forecast signals
# or everything: pipe.run_complete_pipeline(skip_data=False, ...)
"""

from __future__ import annotations

import _bootstrap  # noqa: F401  (makes `kronos` importable from a source checkout)
from kronos.config import Config, apply_fast_mode
from kronos.pipeline import KronosPipeline


class KronosTrainingPipeline(KronosPipeline):
    """The seed's step names over :class:`kronos.pipeline.KronosPipeline`."""

    def __init__(self, config: Config | None = None, fast_mode: bool = False, resume: bool = False) -> None:
        config = config or Config()
        if fast_mode:
            apply_fast_mode(config)
        super().__init__(config, resume=resume)

    def run_data_processing(self):
        return self.process_data()

    def run_tokenizer_training(self):
        return self.train_tokenizer()

    def run_predictor_training(self):
        return self.train_predictor()

    def run_prediction(self):
        return self.predict()

    def run_evaluation(self):
        return self.evaluate()

    def run_backtest(self):
        return self.backtest()

    def run_complete_pipeline(
        self, skip_data: bool = False, skip_tokenizer: bool = False, skip_predictor: bool = False
    ):
        return self.run(skip_data=skip_data, skip_tokenizer=skip_tokenizer, skip_predictor=skip_predictor)


__all__ = ["KronosTrainingPipeline", "Config"]
