"""DDAD's domain adaptation of the feature extractor (Detector.adapt_backbone: 8 epochs,
learning rate 1e-4, lambda 0.1) on a bundled texture detector's 35 training images; the
adapted copy goes to runs/da/NAME_eEPOCHS. Run by run.sh."""
import sys, json, torch
torch.set_num_threads(1)
from cgdiff import Detector
from cgdiff.tune import training_folder_images
name, epochs = sys.argv[1], int(sys.argv[2])
det = Detector.from_pretrained(f"checkpoints/{name}")
hist = det.adapt_backbone(training_folder_images(f"data/textures/{name}"), epochs=epochs)
print(name, "loss", [round(h, 4) for h in hist], "threshold", det.threshold, flush=True)
det.save_pretrained(f"runs/da/{name}_e{epochs}", overwrite=True)
