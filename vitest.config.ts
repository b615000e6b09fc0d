import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Integration tests start real daemons and guests: keep files in one fork each and give them time.
    pool: 'forks',
    testTimeout: 60_000,
    hookTimeout: 120_000,
  },
});
