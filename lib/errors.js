'use strict';
// Node-shaped errors, built in one place. Codes and messages follow Node's
// own (`ERR_INVALID_ARG_TYPE`, ...), and native failures, which the addon
// reports as `{ errno, syscall }`, become system errors with `code`, `errno`
// and `syscall` like the ones libuv failures produce.

const util = require('node:util');

function describe(value) {
  if (value === null) return 'null';
  if (value === undefined) return 'undefined';
  switch (typeof value) {
    case 'bigint': return `type bigint (${value}n)`;
    case 'number': return `type number (${Object.is(value, -0) ? '-0' : value})`;
    case 'boolean': return `type boolean (${value})`;
    case 'symbol': return `type symbol (${String(value)})`;
    case 'function': return `function ${value.name}`;
    case 'object':
      if (value.constructor && 'name' in value.constructor) return `an instance of ${value.constructor.name}`;
      return util.inspect(value, { depth: -1 });
    case 'string': {
      const shown = value.length > 28 ? `${value.slice(0, 25)}...` : value;
      return shown.includes("'") ? `type string (${JSON.stringify(shown)})` : `type string ('${shown}')`;
    }
    default: return util.inspect(value);
  }
}

function nodeError(Base, code, message, caller) {
  const err = new Base(message);
  err.code = code;
  // Node's stack traces read "TypeError [ERR_X]: ..."; keep `name` plain afterwards.
  err.name = `${Base.name} [${code}]`;
  Error.captureStackTrace(err, caller || nodeError);
  void err.stack;
  delete err.name;
  return err;
}

function subject(name) {
  return name.includes('.') ? `"${name}" property` : `"${name}" argument`;
}

function invalidArgType(name, expected, actual, caller) {
  const list = Array.isArray(expected) ? expected : [expected];
  const types = list.length > 1 ? `one of type ${list.slice(0, -1).join(', ')} or ${list[list.length - 1]}` : `of type ${list[0]}`;
  return nodeError(TypeError, 'ERR_INVALID_ARG_TYPE',
                   `The ${subject(name)} must be ${types}. Received ${describe(actual)}`, caller || invalidArgType);
}

function invalidArgValue(name, value, reason = 'is invalid', caller) {
  const kind = name.includes('.') ? 'property' : 'argument';
  let shown = util.inspect(value);
  if (shown.length > 128) shown = `${shown.slice(0, 128)}...`;
  return nodeError(TypeError, 'ERR_INVALID_ARG_VALUE', `The ${kind} '${name}' ${reason}. Received ${shown}`,
                   caller || invalidArgValue);
}

function outOfRange(name, range, value, caller) {
  return nodeError(RangeError, 'ERR_OUT_OF_RANGE',
                   `The value of "${name}" is out of range. It must be ${range}. Received ${util.inspect(value)}`,
                   caller || outOfRange);
}

function badPort(name, port, allowZero = true) {
  return nodeError(RangeError, 'ERR_SOCKET_BAD_PORT',
                   `${name} should be ${allowZero ? '>=' : '>'} 0 and < 65536. Received ${describe(port)}.`, badPort);
}

// Same rule as Node's validatePort.
function validatePort(port, name = 'Port', allowZero = true) {
  if ((typeof port !== 'number' && typeof port !== 'string') ||
      (typeof port === 'string' && port.trim().length === 0) ||
      +port !== (+port >>> 0) || port > 0xFFFF || (port === 0 && !allowZero)) {
    throw badPort(name, port, allowZero);
  }
  return port | 0;
}

// A system error from a negative errno (libuv's convention) and a syscall.
function systemError(errno, syscall, details = {}) {
  const code = util.getSystemErrorName(errno);
  let where = '';
  if (details.address !== undefined && details.address !== null) {
    where = details.port > 0 ? ` ${details.address}:${details.port}` : ` ${details.address}`;
  } else if (details.path) {
    where = ` ${details.path}`;
  }
  const err = new Error(`${syscall} ${code}${where}`);
  err.errno = errno;
  err.code = code;
  err.syscall = syscall;
  for (const key of ['address', 'port', 'path']) {
    if (details[key] !== undefined && details[key] !== null) err[key] = details[key];
  }
  Error.captureStackTrace(err, systemError);
  return err;
}

function validateObject(value, name) {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw invalidArgType(name, 'object', value, validateObject);
  }
}

function validateNumber(value, name, min = 0, max = Number.MAX_SAFE_INTEGER) {
  if (typeof value !== 'number') throw invalidArgType(name, 'number', value, validateNumber);
  if (Number.isNaN(value) || value < min || value > max) {
    throw outOfRange(name, `>= ${min} && <= ${max}`, value, validateNumber);
  }
}

module.exports = {
  invalidArgType, invalidArgValue, outOfRange, badPort, systemError,
  validatePort, validateObject, validateNumber,
};
