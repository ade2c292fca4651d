// Shows the text a WaveFT node reports after it runs (layers matched, file written, ...) in a read-only box.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const STATUS = "waveft_status";

app.registerExtension({
    name: "comfyui-waveft.waveft.status", // publisher.registry-id.feature: unique among every pack's extensions
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!nodeData?.name?.startsWith("WaveFT")) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            const text = Array.isArray(message?.text) ? message.text.join("\n") : null;
            if (!text) return;
            let widget = this.widgets?.find((w) => w.name === STATUS);
            if (!widget) {
                widget = ComfyWidgets.STRING(this, STATUS, ["STRING", { multiline: true }], app).widget;
                widget.serialize = false; // a display only: saved workflows keep their own widget values
                if (widget.inputEl) {
                    widget.inputEl.readOnly = true;
                    widget.inputEl.style.opacity = 0.8;
                }
                this.setSize([Math.max(this.size[0], 400), this.size[1] + 110]); // room for a few lines
            }
            widget.value = text;
            this.setDirtyCanvas?.(true, true);
        };
    },
});
