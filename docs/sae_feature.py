"""Writes docs/sae_feature.png (the README's SAE picture): a TopK SAE trained with SAE-Lens on the bundled model's
image positions (the README's SAE block), the feature that best picks out circles of any colour on held-out
pictures, drawn over a picture with a circle among other shapes: ``python docs/sae_feature.py``."""

from pathlib import Path

import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

from mm_lens import load_toy
from mm_lens.sae import activations, collect
from mm_lens.toy import data
from mm_lens.viz.sae import feature_image_map

torch.manual_seed(0)
model = load_toy()
hook = "blocks.1.hook_resid_post"
cfg = TopKTrainingSAEConfig(d_in=model.cfg.d_model, d_sae=64, k=8)
cfg.metadata.hook_name = hook
sae = TopKTrainingSAE(cfg)
stream = activations(model, data.make_examples(400, seed=0), hook, positions="image", batch_size=128,
                     examples_per_forward=32, in_memory=True)
SAETrainer(SAETrainerConfig(total_training_samples=128 * 1500, train_batch_size_samples=128, lr=3e-3, lr_end=3e-4),
           sae, stream).fit()

# the feature that best picks out circles (any colour) on held-out pictures' patches
held_out = data.make_examples(300, seed=5)
is_circle = torch.tensor([any(o.cell == c and o.shape == "circle" for o in e.objects) for e in held_out for c in range(9)])
with torch.no_grad():
    fires = torch.cat([sae.encode(a) for a, _ in collect(model, held_out, hook, positions="image")]) > 0
true_pos = (fires & is_circle[:, None]).sum(0).float()
f1 = 2 * true_pos / (fires.sum(0) + is_circle.sum())
feature = int(f1.argmax())

example = next(e for e in data.make_examples(200, seed=6, kinds=("shape",)) if len(e.objects) == 3
               and any(o.shape == "circle" for o in e.objects))
inputs = model.to_inputs(example.image, example.prompt)
with torch.no_grad():
    fig = feature_image_map(model, sae, inputs, feature,
                            title=f"SAE feature {feature} at {hook}: circles\n(F1 {float(f1[feature]):.2f} on 2,700 "
                                  "held-out patches)")
out = Path(__file__).with_name("sae_feature.png")
fig.savefig(out, dpi=80)
print(f"feature {feature} F1 {float(f1[feature]):.3f} precision {float(true_pos[feature] / fires[:, feature].sum()):.3f} "
      f"recall {float(true_pos[feature] / is_circle.sum()):.3f}; objects "
      f"{[(o.color, o.shape, o.cell) for o in example.objects]}; wrote {out}")
