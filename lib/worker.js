'use strict';
// The Worker class shared by both sides: a thin EventEmitter around the
// worker's process (a ChildProcess in the primary, `process` in a worker).
// primary.js and child.js add disconnect() and destroy().

const EventEmitter = require('node:events');

function Worker(options) {
  if (!(this instanceof Worker)) return new Worker(options);
  Reflect.apply(EventEmitter, this, []);
  if (options === null || typeof options !== 'object') options = {};
  this.exitedAfterDisconnect = undefined;
  this.state = options.state || 'none';
  this.id = options.id | 0;
  if (options.process) {
    this.process = options.process;
    this.process.on('error', (code, signal) => this.emit('error', code, signal));
    this.process.on('message', (message, handle) => this.emit('message', message, handle));
  }
}

Object.setPrototypeOf(Worker.prototype, EventEmitter.prototype);
Object.setPrototypeOf(Worker, EventEmitter);

Worker.prototype.kill = function kill() {
  Reflect.apply(this.destroy, this, arguments);
};

Worker.prototype.send = function send() {
  return Reflect.apply(this.process.send, this.process, arguments);
};

Worker.prototype.isDead = function isDead() {
  return this.process.exitCode != null || this.process.signalCode != null;
};

Worker.prototype.isConnected = function isConnected() {
  return this.process.connected;
};

module.exports = Worker;
