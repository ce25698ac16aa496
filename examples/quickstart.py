"""Build the tiny Qwen2.5-VL, run it on an image + video + text batch, and take one training step."""

import torch

import mmzoo


def main() -> None:
    for registered in mmzoo.all_models():
        spec = registered.spec
        print(f"model {spec.name} from {registered.plugin.label}: variants {', '.join(spec.variants)}")

    torch.manual_seed(0)
    model = mmzoo.build_model("qwen2_5_vl", "tiny")
    batch = mmzoo.get_model("qwen2_5_vl").example_batch(model.config)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"tiny qwen2_5_vl: {params / 1e6:.1f}M parameters; input {tuple(batch['input_ids'].shape)} tokens, "
        f"image grid {batch['media']['image_grid_thw'].tolist()}, "
        f"video grid {batch['media']['video_grid_thw'].tolist()}"
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(5):
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {out.loss.item():.4f}  logits {tuple(out.logits.shape)}")


if __name__ == "__main__":
    main()
