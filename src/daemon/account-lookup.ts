/**
 * Resolves user and group names to ids from /etc/passwd and /etc/group (Node has no getpwnam). Numeric
 * text is taken as an id as-is. Pure apart from reading the two files, which tests can point elsewhere.
 */
import fs from 'node:fs';
import { VublkError } from '../errors.js';

export class AccountLookupError extends VublkError {
  constructor(kind: 'user' | 'group', name: string, file: string) {
    super('VUBLK_ERR_ACCOUNT_LOOKUP', `no ${kind} named '${name}' in ${file} (give a name that exists, or a numeric id)`, {
      peerFault: true,
    });
  }
}

function lookup(kind: 'user' | 'group', name: string, file: string): number {
  if (/^\d+$/.test(name)) return Number(name);
  let text = '';
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    throw new AccountLookupError(kind, name, file);
  }
  for (const line of text.split('\n')) {
    const fields = line.split(':');
    if (fields[0] === name && fields[2] !== undefined && /^\d+$/.test(fields[2])) return Number(fields[2]);
  }
  throw new AccountLookupError(kind, name, file);
}

export function userId(name: string, passwd = '/etc/passwd'): number {
  return lookup('user', name, passwd);
}

export function groupId(name: string, group = '/etc/group'): number {
  return lookup('group', name, group);
}
