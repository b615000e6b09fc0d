#!/usr/bin/env node
// The `vublk-bench` bin: a checked-in shim, so npm links it at `npm ci` time, before `npm run build` has
// produced the compiled command it loads.
try {
  await import('../dist/bench/src/cli.js');
} catch (error) {
  if (error?.code !== 'ERR_MODULE_NOT_FOUND' || !String(error.message).includes('cli.js')) throw error;
  process.stderr.write('vublk-bench: not built yet: run `npm run build` at the repository root\n');
  process.exit(1);
}
