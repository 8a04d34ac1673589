// Greedy continuations from llama.cpp (through node-llama-cpp's prebuilt CPU binaries) for one or
// more GGUF files. Run by skipit.runtime.llamacpp:
//   node llamacpp_greedy.mjs REQUEST.json RESULT.json
// REQUEST: {node_dir, models: [path], prompts: [string | [token id]], max_tokens, threads, context_size}
// RESULT:  {version, models: [{path, architecture, block_count, total_layers, results: [
//            {prompt_tokens, tokens, text}]}]}
// Pure greedy decoding: temperature 0, no repeat penalty (LlamaCompletion applies one by default),
// each prompt on a cleared sequence, stopping after max_tokens or at an end-of-generation token
// (which is kept, as transformers' generate keeps EOS). String prompts are tokenized by llama.cpp
// with the GGUF's own BOS rule; token prompts are evaluated as given.
import {readFileSync, writeFileSync} from "node:fs";
import {createRequire} from "node:module";
import {dirname, join} from "node:path";
import {pathToFileURL} from "node:url";

const [requestPath, resultPath] = process.argv.slice(2);
const request = JSON.parse(readFileSync(requestPath, "utf8"));
const require = createRequire(join(request.node_dir, "noop.js"));
const entry = require.resolve("node-llama-cpp");
const {getLlama} = await import(pathToFileURL(entry).href);
// entry is <package>/dist/index.js; the package does not export its package.json
const version = JSON.parse(readFileSync(join(dirname(dirname(entry)), "package.json"), "utf8")).version;

const llama = await getLlama({gpu: false, build: "never", logLevel: "error", maxThreads: request.threads});
const out = {version, models: []};
for (const modelPath of request.models) {
    const model = await llama.loadModel({modelPath});
    const arch = model.fileInfo.metadata.general.architecture;
    const context = await model.createContext({contextSize: request.context_size, threads: request.threads});
    const sequence = context.getSequence();
    const results = [];
    for (const prompt of request.prompts) {
        const promptTokens = typeof prompt === "string"
            ? (model.tokens.shouldPrependBosToken && model.tokens.bos != null ? [model.tokens.bos] : [])
                .concat(model.tokenize(prompt))
            : prompt;
        await sequence.clearHistory();
        const tokens = [];
        if (request.max_tokens > 0) {
            for await (const token of sequence.evaluate(promptTokens, {temperature: 0, yieldEogToken: true})) {
                tokens.push(token);
                if (tokens.length >= request.max_tokens || model.isEogToken(token)) break;
            }
        }
        results.push({prompt_tokens: Array.from(promptTokens), tokens, text: model.detokenize(tokens)});
    }
    out.models.push({
        path: modelPath,
        architecture: arch,
        block_count: Number(model.fileInfo.architectureMetadata.block_count),
        total_layers: model.fileInsights.totalLayers,
        results,
    });
    await context.dispose();
    await model.dispose();
}
writeFileSync(resultPath, JSON.stringify(out));
await llama.dispose();
