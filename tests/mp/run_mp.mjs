// Run a MicroPython script under the WebAssembly build of MicroPython (npm package
// @micropython/micropython-webassembly-pyscript), in one node process.
//
//   node run_mp.mjs <package dir> <golden dir> <module.py>... -- <script.py> [python statement]
//
// Every file of <golden dir> is copied to /golden in MicroPython's in-memory filesystem and
// each <module.py> to /lib (on sys.path); then <script.py> runs, followed by the optional
// statement (e.g. "main('/golden')"). The script's output goes to stdout. Exit status: 0 when
// the script finished, 1 when it raised (the traceback goes to stderr), 2 on a usage error.
import { readFileSync, readdirSync, statSync } from "node:fs";
import { basename, join } from "node:path";
import { pathToFileURL } from "node:url";

const args = process.argv.slice(2);
const sep = args.indexOf("--");
if (args.length < 3 || sep < 2 || sep + 1 >= args.length) {
  process.stderr.write("usage: node run_mp.mjs <package dir> <golden dir> <module.py>... -- <script.py> [statement]\n");
  process.exit(2);
}
const [pkgDir, goldenDir, ...modules] = args.slice(0, sep);
const [script, statement] = args.slice(sep + 1);

const { loadMicroPython } = await import(pathToFileURL(join(pkgDir, "micropython.mjs")).href);
const mp = await loadMicroPython({
  heapsize: 48 * 1024 * 1024,
  linebuffer: true,
  stdout: (line) => process.stdout.write(line + "\n"),
  stderr: (line) => process.stderr.write(line + "\n"),
});

mp.FS.mkdir("/golden");
for (const name of readdirSync(goldenDir)) {
  const path = join(goldenDir, name);
  if (statSync(path).isFile()) mp.FS.writeFile("/golden/" + name, readFileSync(path));
}
mp.FS.mkdir("/lib");
for (const path of modules) mp.FS.writeFile("/lib/" + basename(path), readFileSync(path));

let code = readFileSync(script, "utf8");
if (statement) code += "\n" + statement + "\n";
try {
  mp.runPython(code);
} catch (error) {
  if (error.name !== "PythonError") throw error;
  process.stderr.write(error.message + "\n");
  process.exit(1);
}
