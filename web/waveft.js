// Shows the text a WaveFT node reports after it runs (layers matched, file saved, ...) under the node.
import { app } from "../../scripts/app.js";

const STATUS = "waveft_status";

app.registerExtension({
    name: "ComfyUI-WaveFT.status",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!nodeData?.name?.startsWith("WaveFT")) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            const text = Array.isArray(message?.text) ? message.text.join("\n") : null;
            if (!text) return;
            let widget = this.widgets?.find((w) => w.name === STATUS);
            if (!widget) {
                // A read-only display, never saved with the workflow (it would shift the widget values).
                widget = this.addWidget("text", STATUS, "", () => {}, { serialize: false });
                widget.serialize = false;
                widget.disabled = true;
            }
            widget.value = text;
            this.setDirtyCanvas?.(true, true);
        };
    },
});
