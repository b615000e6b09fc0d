#!/usr/bin/env node
// Prints the top self-time functions of V8 .cpuprofile files (node --cpu-prof), e.g.
//   node bench/scripts/cpuprofile-top.mjs /tmp/prof/*.cpuprofile
import { readFileSync } from 'node:fs';

const limit = Number(process.env.TOP ?? 25);
for (const file of process.argv.slice(2)) {
  const profile = JSON.parse(readFileSync(file, 'utf8'));
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const self = new Map();
  const deltas = profile.timeDeltas;
  let total = 0;
  for (let i = 0; i < profile.samples.length; i++) {
    const node = byId.get(profile.samples[i]);
    const dt = deltas[i] ?? 0;
    total += dt;
    const f = node.callFrame;
    const where = f.url ? `${f.url.replace(/^.*\/(dist|node_modules)\//, '$1/')}:${f.lineNumber + 1}` : '';
    const key = `${f.functionName || '(anonymous)'} ${where}`.trim();
    self.set(key, (self.get(key) ?? 0) + dt);
  }
  const rows = [...self.entries()].sort((a, b) => b[1] - a[1]).slice(0, limit);
  console.log(`\n${file}: ${(total / 1e6).toFixed(2)} s sampled`);
  for (const [key, us] of rows)
    console.log(`${((us / total) * 100).toFixed(1).padStart(6)} %  ${(us / 1e3).toFixed(0).padStart(7)} ms  ${key}`);
}
