// weir's build of a JavaScript (or TypeScript) plugin, run by `weir build` with the tools it
// installed beside this file: esbuild bundles the plugin with weir's SDK into one module, and
// componentize-js makes it a component of the world its exports name.
//
// node weir-build.mjs component ENTRY SDK WIT APP BUNDLE OUT
// - ENTRY: the module weir writes around the plugin (connects the host's log, re-exports APP)
// - SDK: weir.js, what `import ... from "weir"` means
// - APP: the plugin's app.js or app.ts, named in errors
// node weir-build.mjs native APP SDK BUNDLE: APP bundled for Node.js (`weir bench DIR`).
// On failure it prints one error, for the user, and exits with 1.

import { componentize } from "@bytecodealliance/componentize-js";
import * as esbuild from "esbuild";
import { writeFile } from "node:fs/promises";
import { resolve } from "node:path";

function fail(message) {
  console.error(message);
  process.exit(1);
}

/** Bundles `entry` with the SDK `sdk` into `bundle`; the bundle's exports. */
async function bundled(entry, sdk, bundle, platform) {
  try {
    const built = await esbuild.build({
      entryPoints: [entry],
      bundle: true,
      format: "esm",
      platform,
      mainFields: ["module", "main"],
      alias: { weir: sdk },
      external: ["weir:plugin/*"],
      outfile: bundle,
      metafile: true,
      logLevel: "silent",
    });
    return Object.values(built.metafile.outputs)[0].exports;
  } catch (e) {
    // esbuild names files relative to the working directory: named in full here.
    const where = (m) => (m.location ? `${resolve(m.location.file)}:${m.location.line}:${m.location.column + 1}: ` : "");
    const hint = (m) =>
      /^Could not resolve "node:/.test(m.text)
        ? " (a plugin runs in weir's sandbox: Node.js's modules, files, network and clock are not there)"
        : "";
    fail((e.errors ?? []).map((m) => `${where(m)}${m.text}${hint(m)}`).join("\n") || String(e));
  }
}

const [mode, ...args] = process.argv.slice(2);
if (mode === "native") {
  const [app, sdk, bundle] = args;
  await bundled(app, sdk, bundle, "node");
  process.exit(0);
}
const [entry, sdk, wit, app, bundle, out] = args;
const exports = await bundled(entry, sdk, bundle, "neutral");
const worlds = ["filter", "enrich"].filter((name) => exports.includes(name));
if (worlds.length !== 1) {
  fail(
    worlds.length
      ? `${app}: exports both filter and enrich: a component exports one world, so one weir.filter or weir.enrich per plugin`
      : `${app}: exports neither filter nor enrich: write \`export const { init, filter } = weir.filter(fn)\` (or enrich)`,
  );
}
const world = worlds[0];
if (!exports.includes("init")) {
  fail(`${app}: exports ${world} but not init: write \`export const { init, ${world} } = weir.${world}(fn)\``);
}

try {
  const { component } = await componentize({
    sourcePath: bundle,
    witPath: wit,
    worldName: world,
    // Nothing but the world: weir offers no WASI interface (no clock, stdio, random or network).
    disableFeatures: ["stdio", "random", "clocks", "http", "fetch-event"],
  });
  await writeFile(out, component);
} catch (e) {
  fail(`componentize-js could not build ${app}: ${e.message ?? e}`);
}
console.log(world);
