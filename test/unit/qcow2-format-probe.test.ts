/** Backing-file names resolve as QEMU resolves plain files; protocol names are refused. */
import { describe, expect, it } from 'vitest';
import { Qcow2Error } from '../../src/backend/qcow2/errors.js';
import { parseImageFormat, resolveBackingPath } from '../../src/backend/qcow2/format-probe.js';

describe('backing file names', () => {
  it('relative names resolve against the directory of the image that names them', () => {
    expect(resolveBackingPath('/images/vm/top.qcow2', 'base.raw')).toBe('/images/vm/base.raw');
    expect(resolveBackingPath('/images/vm/top.qcow2', '../shared/base.qcow2')).toBe('/images/shared/base.qcow2');
    expect(resolveBackingPath('relative/top.qcow2', 'mid/mid.qcow2')).toBe('relative/mid/mid.qcow2');
    expect(resolveBackingPath('/images/vm/top.qcow2', '/abs/base.raw')).toBe('/abs/base.raw');
    expect(resolveBackingPath('/images/top.qcow2', 'dir/with:colon.raw')).toBe('/images/dir/with:colon.raw');
    expect(resolveBackingPath('/images/top.qcow2', './odd:name.raw')).toBe('/images/odd:name.raw');
  });

  it('protocol names and empty names are refused', () => {
    for (const name of ['nbd://host/export', 'json:{"driver":"file"}', 'file:/etc/passwd', 'http://x/y', '']) {
      expect(() => resolveBackingPath('/images/top.qcow2', name)).toThrow(Qcow2Error);
    }
  });

  it('only raw and qcow2 are formats', () => {
    expect(parseImageFormat('raw', 'x')).toBe('raw');
    expect(parseImageFormat('qcow2', 'x')).toBe('qcow2');
    expect(() => parseImageFormat('vmdk', 'backing file of a')).toThrow(/format 'vmdk' is not supported/);
  });
});

describe('Qcow2Error', () => {
  it('is a VublkError; image faults are peerFault, I/O failures are not', async () => {
    const { VublkError } = await import('../../src/errors.js');
    const invalid = new Qcow2Error('QCOW2_INVALID', 'x');
    expect(invalid).toBeInstanceOf(VublkError);
    expect(invalid).toMatchObject({ code: 'VUBLK_ERR_QCOW2_INVALID', name: 'Qcow2Error', peerFault: true, fatal: false });
    expect(new Qcow2Error('QCOW2_IO', 'x')).toMatchObject({ code: 'VUBLK_ERR_QCOW2_IO', peerFault: false });
  });
});
