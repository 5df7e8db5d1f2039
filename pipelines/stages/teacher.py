"""The teacher stage: trains the recipe's teacher architecture when the user brings no teacher of their own."""
from __future__ import annotations

from pipelines import run_data, run_keys, run_models, run_training
from pipelines.stage import AugmentedSettings, Stage, resolve_augment


class Teacher(Stage):
    name = "teacher"
    mixed_precision = True
    trains = True
    settings = AugmentedSettings
    model_file = "teacher.keras"
    keras_row = ("teacher", "teacher")

    def title(self, recipe):
        t = recipe.teacher
        if t.finetune:
            return f"fine-tune teacher '{t.backbone}' from {t.weights} by BiT-HyperRule"
        return f"train teacher '{t.arch}' ({t.epochs} epochs)"

    def resolve(self, settings, recipe):
        return resolve_augment(settings, recipe)

    def key(self, ctx):
        tr = ctx.recipe.training
        t = ctx.recipe.teacher
        # fine-tuning reads none of the keys the rule replaces, so changing them does not rerun it
        # flip_average is how the trained teacher is read, not how it trains
        spec = (t.model_dump(include={"finetune", "backbone", "options", "bit_scale", "bit_resolution",
                                      "label_smoothing"}) if t.finetune else t.model_dump(exclude={"flip_average"}))
        return {**run_keys.data_key(ctx), "batch_size": tr.batch_size, "strategy": tr.strategy,
                "mixed_precision": run_keys.precision(ctx), "teacher": spec,
                "weights": None if t.weights is None else run_keys.file_key(ctx, t.weights, "teacher.weights"),
                **run_keys.replicas_key(ctx)}

    def check(self, ctx):
        # the architecture and its options build for this data (at the rule's crop), its weights file loads
        if ctx.recipe.teacher.finetune:
            crop = run_models.bit_rule(ctx).resolution[1]
            run_models.build_teacher(ctx, (crop, crop, run_data.load(ctx).info.input_shape[-1]))
        else:
            run_models.build_teacher(ctx)

    def run(self, ctx, out):
        from edge_kd.distill.distiller import Distiller
        from edge_kd.fileio import write_json
        from pipelines.stages.common import save_model

        t = ctx.recipe.teacher
        if t.finetune:
            return self._finetune(ctx, out)
        model = run_models.build_teacher(ctx)
        distiller = Distiller(model, augment=run_training.augmenter(ctx, self.name), label_smoothing=t.label_smoothing)
        history = run_training.fit(ctx, distiller, t.epochs, t.learning_rate, optimizer=t)
        save_model(model, out / self.model_file)
        write_json(out / "history.json", history)
        return {"val_accuracy": history["val_accuracy"][-1]}

    def _finetune(self, ctx, out):
        """BiT-HyperRule: the backbone at the rule's crop resolution with a zero head, trained through a random
        resize-and-crop (and MixUp where the rule has it) by the rule's SGD schedule; the saved teacher takes
        crop×crop images, and the adapter resizes the student's input to it."""
        from edge_kd import bit
        from edge_kd.augment import AugmentConfig, Augmenter
        from edge_kd.distill.distiller import Distiller
        from edge_kd.fileio import write_json
        from pipelines.stages.common import save_model

        t, info = ctx.recipe.teacher, run_data.load(ctx).info
        rule = run_models.bit_rule(ctx)
        described = rule.describe()
        steps_per_epoch = run_data.steps_per_epoch(ctx)
        epochs = bit.epochs_for(rule.steps, steps_per_epoch)
        described["trained_steps"] = epochs * steps_per_epoch
        write_json(out / "bit_rule.json", described)
        print(f"  teacher: BiT-HyperRule, branch {rule.branch}: " + "; ".join(rule.why.values()), flush=True)
        print(f"  teacher: {epochs} epochs of {steps_per_epoch} steps ({described['trained_steps']} steps; the rule's "
              f"{rule.steps})", flush=True)
        crop = rule.resolution[1]
        net = run_models.build_teacher(ctx, (crop, crop, info.input_shape[-1]))
        model = bit.training_model(net, info.input_shape, rule, seed=ctx.recipe.seed)
        augment = (Augmenter(AugmentConfig(mixup=rule.mixup), seed=ctx.recipe.seed, fill_value=info.input_offset)
                   if rule.mixup else None)
        distiller = Distiller(model, augment=augment, label_smoothing=t.label_smoothing)
        history = run_training.fit(ctx, distiller, epochs, rule.learning_rate, optimizer=bit.Optimizer(rule))
        save_model(net, out / self.model_file)
        write_json(out / "history.json", history)
        return {"val_accuracy": history["val_accuracy"][-1], "bit_rule": described}
