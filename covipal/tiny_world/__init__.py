"""The miniature: everything that exists only for the tiny world, apart from what runs on real models.

synthetic     the generator: scenes, questions, and which visual tokens each question is about (ground truth)
samples       questions with their images or videos as `Sample`s, for pretraining, training and benchmarks
layout        where the pictures lie in a model's visual tokens (the ground truth's coordinates), per model
export        the training split and the benchmarks written in the released layouts (VLMEvalKit TSVs)
training_data the cached training split as data sources (configs/data/tiny_world.yaml)
model         the tiny models: built from a spec, pretrained once, cached (configs/model/tiny.yaml: LLaVA-OneVision,
              tiny_qwen.yaml: Qwen2.5-VL)
pretrain      its pretraining recipe; grounding: the attention-supervision terms the recipe uses
oracle        the ground-truth pruner (configs/pruner/oracle.yaml) and the focus pruner of pretraining
accuracy      accuracy on the tiny world's questions without VLMEvalKit (pretraining's held-out check)
label_quality how well labels and PPM scores rank the relevant tokens (scripts/label_report.py)

Only entry points, configs (`_target_`), scripts and tests import this package; the framework's own folders
(models, data, pruning, training, evaluation, efficiency) never do (tests/test_layers.py).
"""
